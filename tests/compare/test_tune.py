"""Per-arm tuning (rlora/compare/tune.py): parsing --tune, the candidates, and the pick through the score seam."""
from pathlib import Path

import pytest

from helpers import run_config
from rlora.compare.tune import at_edge, candidates, folder_name, parse_tune, pick, tune_arms, tuning_config
from rlora.config import ConfigError

ARMS = [("lora", "proportional"), ("mtl", "proportional")]


@pytest.fixture
def cfg(tmp_path):
    return run_config(tmp_path / "model", tmp_path / "data", tmp_path / "out")


def test_parse_and_candidates(cfg):
    spec = parse_tune(["trainer.learning_rate=3e-4, 1e-3,3e-3", "adapter.dropout=0.0,0.1"], cfg)
    assert spec == [("trainer.learning_rate", ["3e-4", "1e-3", "3e-3"]), ("adapter.dropout", ["0.0", "0.1"])]
    cands = candidates(spec)
    assert len(cands) == 6 and cands[0] == ["trainer.learning_rate=3e-4", "adapter.dropout=0.0"]
    assert cands[1] == ["trainer.learning_rate=3e-4", "adapter.dropout=0.1"]
    assert cands[-1][0] == "trainer.learning_rate=3e-3"
    assert folder_name(cands[0]) == "trainer.learning_rate=3e-4,adapter.dropout=0.0"


@pytest.mark.parametrize("items, match", [
    (["trainer.learning_rate=1e-3"], "at least two values"),
    (["trainer.learning_rate"], "use KEY=V1,V2"),
    (["trainer.learning_rate=1e-3,1e-3"], "names a value twice"),
    (["adapter.method=lora,mtl"], "adapter.method defines the comparison itself and cannot be tuned"),
    (["trainer.seed=1,2"], "trainer.seed defines the comparison itself"),
    (["trainer.lr=1,2"], "--tune trainer.lr: no such config key"),
    (["trainer.learning_rate=1e-3,2e-3", "trainer.learning_rate=3e-3,4e-3"], "is given twice"),
    (["trainer.per_device_eval_batch_size=8,0"],
     "--tune trainer.per_device_eval_batch_size=0: .*trainer.per_device_eval_batch_size must be >= 1, got 0"),
    (["trainer.max_steps=10,20"], "--tune trainer.max_steps: trainer.max_steps changes the number of batches drawn"),
    (["trainer.per_device_train_batch_size=2,4"], "per_device_train_batch_size changes the batch boundaries"),
    (["trainer.gradient_accumulation_steps=1,2"], "gradient_accumulation_steps changes the batch boundaries"),
    (["adapter.r=4,8"], "--tune adapter.r: adapter.r sets the adapters' rank, so arms picking different values "
                        "would no longer be compared at equal parameter budgets"),
    (["adapter.num_heads=2,4"], "adapter.num_heads sets the number of heads"),
    (["adapter.target_modules=[q_proj],[v_proj]"], "adapter.target_modules sets which modules are adapted"),
    (["model.name_or_path=a,b"], "model.name_or_path sets the base model"),
    (["adapter.diagonal=true,false"], "adapter.diagonal sets MTL-LoRA's task parameters"),
    (["sampler.temperature=1,2"], "--tune sampler.temperature: sampler.temperature changes the task sampling, so "
                                  "arms picking different values would no longer train on the same data order"),
])
def test_bad_tune_specs_are_one_line_errors(cfg, items, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_tune(items, cfg)
    assert "\n" not in str(err.value)


def test_the_pick_is_the_best_validation_score_per_arm_and_a_tie_goes_to_the_first():
    """A fake scorer through the seam: lora is best at 1e-3, mtl at 3e-3; a tie picks the first listed value."""
    truth = {"trainer.learning_rate=3e-4": {ARMS[0]: 0.40, ARMS[1]: 0.41},
             "trainer.learning_rate=1e-3": {ARMS[0]: 0.55, ARMS[1]: 0.50},
             "trainer.learning_rate=3e-3": {ARMS[0]: 0.31, ARMS[1]: 0.58}}
    seen = []

    def score(overrides):
        seen.append(overrides)
        return truth[overrides[0]]

    picks = tune_arms(ARMS, [("trainer.learning_rate", ["3e-4", "1e-3", "3e-3"])], score)
    assert seen == [[k] for k in truth]                       # every candidate scored once, for all arms at once
    assert [(p["method"], p["picked"]) for p in picks] == [("lora", "trainer.learning_rate=1e-3"),
                                                           ("mtl", "trainer.learning_rate=3e-3")]
    assert picks[0]["overrides"] == ["trainer.learning_rate=1e-3"]
    assert picks[1]["values"] == {"trainer.learning_rate": "3e-3"}
    assert picks[1]["scores"] == {k: v[ARMS[1]] for k, v in truth.items()}
    assert picks[0]["edge"] == {} and picks[1]["edge"] == {"trainer.learning_rate": "largest"}
    assert pick({"x": 0.5, "y": 0.7, "z": 0.7}) == "y"


def test_a_pick_at_the_edge_of_three_or_more_numeric_values_is_flagged():
    """By value, not by the order listed; two values (always an edge) and words are not flagged; with two keys
    each is judged on its own."""
    lr = ("trainer.learning_rate", ["3e-3", "3e-4", "1e-3"])
    assert at_edge({"trainer.learning_rate": "3e-3"}, [lr]) == {"trainer.learning_rate": "largest"}
    assert at_edge({"trainer.learning_rate": "3e-4"}, [lr]) == {"trainer.learning_rate": "smallest"}
    assert at_edge({"trainer.learning_rate": "1e-3"}, [lr]) == {}
    assert at_edge({"trainer.learning_rate": "3e-3"}, [("trainer.learning_rate", ["1e-3", "3e-3"])]) == {}
    sched = ("trainer.lr_scheduler_type", ["linear", "cosine", "constant"])
    assert at_edge({"trainer.lr_scheduler_type": "linear"}, [sched]) == {}
    wd = ("trainer.weight_decay", ["0", "0.01", "0.1"])
    assert at_edge({"trainer.learning_rate": "1e-3", "trainer.weight_decay": "0"}, [lr, wd]) == \
        {"trainer.weight_decay": "smallest"}


def test_tuning_config_scores_every_validation_row_with_fewer_steps(cfg):
    c = tuning_config(cfg, ["trainer.learning_rate=3e-3"], steps=2)
    assert (c.eval.split, c.eval.max_examples_per_task) == ("val", None)
    assert (c.trainer.max_steps, c.trainer.learning_rate) == (2, 3e-3)
    assert cfg.diagnostics.enabled and not c.diagnostics.enabled
    assert tuning_config(cfg, ["trainer.max_steps=5"], steps=2).trainer.max_steps == 5   # a tuned key wins
    assert tuning_config(cfg, [], steps=None).trainer.max_steps == cfg.trainer.max_steps


def test_the_report_s_tuning_table_and_budget_line():
    from rlora.compare.report import _budget_lines, _tuning_table

    tuning = {"seed": 42, "steps": 1, "val_rows": 6,
              "picks": [{"method": "lora", "sampler": "p", "scores": {"lr=1": 0.5, "lr=2": 0.25}, "picked": "lr=1"},
                        {"method": "mtl", "sampler": "p", "scores": {"lr=1": 0.125, "lr=2": 0.75}, "picked": "lr=2"}]}
    lines = _tuning_table(tuning)
    assert lines[0].startswith("**Tuning** (per arm: one cell per candidate, seed 42, 1 step, scored on 6 validation")
    assert lines[2:] == ["| method | sampler | lr=1 | lr=2 | pick |", "| --- | --- | ---: | ---: | --- |",
                         "| lora | p | 50.0 | 25.0 | lr=1 |", "| mtl | p | 12.5 | 75.0 | lr=2 |"]
    assert "200 steps" in _tuning_table({**tuning, "steps": 200})[0]
    assert not any("edge" in line for line in lines)  # picks made before the flag existed have none
    tuning["picks"][1].update(values={"lr": "2"}, edge={"lr": "largest"})
    assert _tuning_table(tuning)[-2:] == ["", "**Picks at the edge of the range tried:** mtl/p the largest lr (2). The "
                                          "best value may lie beyond it: widen the range to know whether these arms "
                                          "were tuned."]
    budget = {"mode": "total", "lora_rank": 15, "ranks": {"lora/p": 15, "mtl/p": 8}}
    assert _budget_lines(budget) == ["**Budget** `total`: LoRA rank 15; ranks lora/p 15, mtl/p 8."]


def test_check_pairing_names_the_cells_and_does_not_blame_the_out_folder_alone():
    from rlora.compare.cells import CompareError
    from rlora.compare.runner import check_pairing

    rec = dict(sampler="proportional", seed=42, row_ids={"a": [0, 1]})
    with pytest.raises(CompareError, match=r"cells lora-s42 and hydra-s42 \(seed 42\) trained on different data "
                                           r"orders, so they cannot be paired: check that no per-arm override") as e:
        check_pairing([{**rec, "run_name": "lora-s42", "data_order": "x"},
                       {**rec, "run_name": "hydra-s42", "data_order": "y"}])
    assert "\n" not in str(e.value)
    check_pairing([{**rec, "run_name": "lora-s42", "data_order": "x"}, {**rec, "run_name": "hydra-s42", "data_order": "x"}])


@pytest.mark.parametrize("seeds, tuning", [(1, 1007), (3, 1007), (1500, 1507)])
def test_tuning_seeds_are_disjoint_from_the_verdict_s(tmp_path, monkeypatch, seeds, tuning):
    """Suite hands the tuning score a config seeded past the verdict's seeds (the same seed for any --seeds below
    1,000, so adding seeds later keeps the tuning cells); the verdict gets trainer.seed."""
    import rlora.compare.suite as suite
    from helpers import write_tasks

    write_tasks(tmp_path / "d", n_train=24, n_dev=4)
    cfg = run_config(tmp_path / "model", tmp_path / "d", tmp_path, trainer__seed=7)
    seen = {}

    class Verdict:
        def __init__(self, c, arms, n, *a, **kw):
            # the verdict's seeds are trainer.seed + 0 .. n - 1 (grid.plan)
            seen["verdict"] = list(range(c.trainer.seed, c.trainer.seed + n))
            seen["tuning"] = kw["tuning"]["seed"]
            self.cell_records = []

        def run(self):
            return {}

    def score(name, c):
        seen["score"] = c.trainer.seed
        return lambda overrides: {("lora", "proportional"): 0.5}

    monkeypatch.setattr(suite, "Comparison", Verdict)
    suite.Suite(cfg, [("lora", "proportional")], seeds, "lora", "ab", tmp_path / "out",
                tune=[("trainer.learning_rate", ["1e-3", "2e-3"])], val_rows=4, score=score).run()
    assert seen["verdict"] == list(range(7, 7 + seeds))
    assert seen["score"] == seen["tuning"] == tuning and seen["score"] not in seen["verdict"]


def test_the_suite_says_when_a_pick_is_at_the_edge_of_the_range(tmp_path, monkeypatch, capsys):
    import rlora.compare.suite as suite
    from helpers import write_tasks

    write_tasks(tmp_path / "d", n_train=24, n_dev=4)
    cfg = run_config(tmp_path / "model", tmp_path / "d", tmp_path)
    seen = {}

    class Verdict:
        def __init__(self, c, arms, n, *a, **kw):
            seen["tuning"] = kw["tuning"]
            self.cell_records = []

        def run(self):
            return {}

    scores = {"1e-3": 0.4, "2e-3": 0.5, "3e-3": 0.6}
    monkeypatch.setattr(suite, "Comparison", Verdict)
    suite.Suite(cfg, [("lora", "proportional")], 1, "lora", "ab", tmp_path / "out",
                tune=[("trainer.learning_rate", list(scores))], val_rows=4,
                score=lambda name, c: lambda o: {("lora", "proportional"): scores[o[0].split("=")[1]]}).run()
    assert seen["tuning"]["picks"][0]["edge"] == {"trainer.learning_rate": "largest"}
    assert ("tuned lora/proportional: trainer.learning_rate=3e-3 (validation trainer.learning_rate=1e-3 40.0, "
            "trainer.learning_rate=2e-3 50.0, trainer.learning_rate=3e-3 60.0); the largest trainer.learning_rate "
            "(3e-3) is at the edge of the range: the best may lie beyond it") in capsys.readouterr().out


def test_a_tuning_candidate_s_mlflow_parent_run_ends_finished(tiny_model_dir, tmp_path, monkeypatch):
    """comparison_score with real MLflow (sqlite): the candidate's parent run is FINISHED, not left RUNNING.
    Training is replaced by writing each cell's record (the score is its mean accuracy)."""
    import json

    from mlflow.tracking import MlflowClient

    from helpers import write_tasks
    from rlora.compare.datasets import carve_validation
    from rlora.compare.runner import Comparison
    from rlora.compare.tune import comparison_score

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = carve_validation(write_tasks(tmp_path / "d", n_train=8, n_dev=4), tmp_path / "v", rows=2, seed=0)
    cfg = run_config(tiny_model_dir, data, tmp_path, mlflow__tracking_uri=uri)
    acc = {"lora": {"a": 0.25, "b": 0.5}, "hydra": {"a": 0.5, "b": 0.5}}

    def fake_cells(self, cfg, todo):
        for c in todo:
            (self.out / "cells").mkdir(parents=True, exist_ok=True)
            (self.out / "cells" / f"{c.key}.json").write_text(json.dumps(
                {"method": c.method, "sampler": c.sampler, "accuracy": acc[c.method]}))

    monkeypatch.setattr(Comparison, "_run_cells", fake_cells)
    score = comparison_score(cfg, [("lora", "proportional"), ("hydra", "proportional")], "lora", "ab",
                             tmp_path / "tune", None, True, False)(["trainer.learning_rate=1e-3"])
    assert score == {("lora", "proportional"): 0.375, ("hydra", "proportional"): 0.5}
    runs = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()],
                                         filter_string="tags.`rlora.compare` = 'tune-trainer.learning_rate=1e-3'")
    assert [r.info.status for r in runs] == ["FINISHED"]


@pytest.mark.parametrize("field", ["path", "hf_source"])
def test_tuning_refuses_a_task_outside_data_path_whose_rows_it_cannot_carve(cfg, tmp_path, field):
    """--tune carves the validation rows from data.path's task folders: a task with its own path or hf_source
    would train on all its rows (and have no validation split), so the comparison is refused before any cell."""
    from rlora.compare.suite import Suite
    from rlora.config import TaskSpec

    cfg.data.tasks = [TaskSpec(name="parity"), TaskSpec(name="mine", **{field: str(tmp_path / "elsewhere")})]
    suite = Suite(cfg, ARMS, 1, "lora", "ab", tmp_path / "cmp", tune=[("trainer.learning_rate", ["1e-3", "3e-3"])])
    with pytest.raises(ConfigError) as err:
        suite.folders()
    assert str(err.value) == (f"data.tasks: task mine has its own {field}, but --tune carves its validation rows "
                              f"from the task folders of data.path ({cfg.data.path}) only: put the task's folder "
                              f"there and drop its {field}, or compare without --tune")
    assert not (tmp_path / "cmp").exists()
    assert Suite(cfg, ARMS, 1, "lora", "ab", tmp_path / "cmp").folders() == {"": Path(cfg.data.path)}
