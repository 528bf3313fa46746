"""benchmarks/suite.py, the three-set suite over `rlora compare`, on stand-in sets (tiny random model:
mechanics only): every set tuned and reported, pooled, cells stored and resumed on another work folder."""
import json
import shutil
from pathlib import Path

import pytest

from helpers import load_benchmark, write_tasks

REPO = Path(__file__).resolve().parents[1]


def load_suite():
    return load_benchmark("suite")


def renamed_task(src: Path, dst: Path, name: str) -> None:
    """A copy of task folder ``src`` as task ``name`` (folder, task field and ids renamed)."""
    dst.mkdir(parents=True)
    for f in src.glob("*.jsonl"):
        (dst / f.name).write_text(f.read_text().replace(f'"{src.name}', f'"{name}'))


@pytest.fixture
def data_root(tmp_path):
    """The suite's set names in one folder: mtl_cpu6 and bigbench_default (three tasks each) and mtl_gpu12
    (mtl_cpu6's tasks plus two more, from which mtl_gpu12_rest is built)."""
    root = tmp_path / "data"
    write_tasks(root / "mtl_cpu6", n_train=24, n_dev=6, seed=0)
    write_tasks(root / "bigbench_default", n_train=24, n_dev=6, seed=1)
    shutil.copytree(root / "mtl_cpu6", root / "mtl_gpu12")
    for task in ("parity", "sign"):
        renamed_task(root / "mtl_cpu6" / task, root / "mtl_gpu12" / f"{task}_b", f"{task}_b")
    return root


@pytest.mark.slow
def test_quick_suite_reports_every_set_and_resumes_from_stored_cells(tiny_model_dir, data_root, tmp_path, capsys):
    """One set first (only its cells train, no report), then all three (the first set's cells are skipped, every
    set tuned and reported, pooled); then a fresh work folder trains nothing and gives the same verdicts."""
    suite = load_suite()
    out, work = tmp_path / "results", tmp_path / "work"
    args = ["--quick", "--json", "--out", str(out), f"model.name_or_path={tiny_model_dir}",
            f"data.path={data_root / 'mtl_cpu6'}", "mlflow.enabled=false", "eval.max_examples_per_task=null"]
    first = suite.main(args + ["--work", str(work), "--sets", "bigbench_default"])
    assert list(first["sets"]) == ["bigbench_default"] and first["pooled"] is None
    assert len(suite.cell_files(out / "suite_quick_cells")) == 8 and not (out / "suite_quick.md").exists()
    # the finished set's own report lands at once; the others' do not exist yet
    assert (out / "suite_quick_bigbench_default.md").read_text() == (work / "bigbench_default" / "compare.md").read_text()
    assert json.loads((out / "suite_quick_bigbench_default.json").read_text())["tuning"]["picks"]
    assert (out / "suite_quick_forest_bigbench_default.png").stat().st_size > 5_000
    assert not list(out.glob("suite_quick_mtl_cpu6*")) and not list(out.glob("suite_quick_forest_mtl_cpu6*"))
    alone = json.loads((out / "suite_quick_bigbench_default.json").read_text())
    log = capsys.readouterr().out
    assert "bigbench_default: tuning 4/4, verdict 4/4 cells" in log
    # a run of some of the sets: its own figures under another name, none pooled
    partial = json.loads(log.strip().splitlines()[-1])
    assert partial["benchmark"] == "suite_quick_partial" and set(partial["figures"]) == {"align_minus_lora_bigbench_default"}
    assert partial["figures"]["align_minus_lora_bigbench_default"]["value"] == round(
        100 * alone["comparisons"][0]["mean"]["diff"], 2)

    result = suite.main(args + ["--work", str(work)])
    assert list(result["sets"]) == suite.SETS
    log = capsys.readouterr().out
    assert log.count("finished earlier: skipped") == 8
    # per set: 2 methods x 2 learning rates tuning cells, then 2 methods x 2 seeds verdict cells
    stored = suite.cell_files(out / "suite_quick_cells")
    assert len(stored) == 3 * (4 + 4) and stored == suite.cell_files(work)
    for s in suite.SETS:
        picks = result["sets"][s]["tuning"]["picks"]
        assert [p["method"] for p in picks] == ["lora", "align"]
        assert all(p["picked"] in ("trainer.learning_rate=1e-3", "trainer.learning_rate=3e-3") for p in picks)
        assert (out / f"suite_quick_forest_{s}.png").stat().st_size > 5_000
    # the set trained alone bootstrapped with its index in the suite (1): its report is the same as in the whole run
    again_alone = json.loads((out / "suite_quick_bigbench_default.json").read_text())
    assert again_alone["comparisons"] == alone["comparisons"] and alone["rng_seed"] == 42 + 1
    text = (out / "suite_quick.md").read_text()
    assert all(f"## {s}" in text for s in suite.SETS) and "## Pooled over the sets" in text
    record = json.loads((out / "suite_quick.json").read_text())
    assert set(record["sets"]) == set(suite.SETS) and record["pooled"]["sets"] == suite.SETS
    assert record["wall"]["bigbench_default"]["verdict_cells"] == "4/4" and record["settings"]["seeds"] == 2
    figures = json.loads(log.strip().splitlines()[-1])
    assert figures["benchmark"] == "suite_quick"
    f = figures["figures"]["align_minus_lora_pooled"]
    assert f["interval"][0] <= f["value"] <= f["interval"][1] and f["unit"] == "points"
    assert set(figures["figures"]) == {f"align_minus_lora_{w}" for w in [*suite.SETS, "pooled"]}
    # a set's figure (from its own report) is its line in the pooled report
    sets_in_pool = record["pooled"]["comparisons"][0]["pooled"]["sets"]
    assert all(figures["figures"][f"align_minus_lora_{s}"]["value"] == round(100 * sets_in_pool[s]["diff"], 2)
               for s in suite.SETS)

    # a fresh work folder: the stored cells are copied in and nothing trains again; the same verdicts
    again = suite.main(args + ["--work", str(tmp_path / "work2")])
    log = capsys.readouterr().out
    assert f"{len(stored)} committed cells copied" in log and log.count("finished earlier: skipped") == len(stored)
    assert not list((tmp_path / "work2").glob("**/runs"))
    assert again["pooled"]["comparisons"][0]["pooled"]["diff"] == result["pooled"]["comparisons"][0]["pooled"]["diff"]


def test_sync_copies_finished_cells_counts_the_planned_ones_and_trains_nothing(tmp_path, capsys):
    """--sync copies every record; the progress counts the suite's methods, and verdict cells of the planned
    seeds (--seeds 3 plans seeds 42..44) trained with their method's pick only: LoRA's tuning is complete and
    picks 3e-3 over 1e-2 (the 1e-3 cell of seed 42 is superseded); MTL-LoRA's is not, so its cell is not counted
    yet."""
    suite = load_suite()
    work = tmp_path / "work"
    lr = "trainer.learning_rate"
    tune = {v: {"method": "lora", "seed": 1042, "wall_s": 600.0, "accuracy": {"a": acc, "b": 0.5}}
            for v, acc in [("3e-4", 0.4), ("1e-3", 0.5), ("3e-3", 0.6), ("1e-2", 0.55)]}
    cells = {**{f"tune/{lr}={v}/cells/t{v}.json": rec for v, rec in tune.items()},
             f"tune/{lr}=1e-3/cells/m1.json": {"method": "mtl", "seed": 1042, "wall_s": 600.0, "accuracy": {"a": 0.9}},
             "cells/k1.json": {"method": "lora", "seed": 42, "wall_s": 3600.0, "overrides": [f"{lr}=1e-3"]},
             "cells/k2.json": {"method": "lora", "seed": 42, "wall_s": 3600.0, "overrides": [f"{lr}=3e-3"]},
             "cells/k3.json": {"method": "lora", "seed": 44, "wall_s": 3600.0, "overrides": [f"{lr}=3e-3"]},
             "cells/k4.json": {"method": "mtl", "seed": 42, "wall_s": 3600.0, "overrides": [f"{lr}=1e-3"]},
             "cells/k5.json": {"method": "hydra", "seed": 42, "wall_s": 3600.0, "overrides": []}}  # not a suite method
    for rel, rec in cells.items():
        (work / "mtl_cpu6" / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "mtl_cpu6" / rel).write_text(json.dumps(rec))
    suite.main(["--sync", "--work", str(work), "--out", str(tmp_path / "results")])
    assert suite.cell_files(tmp_path / "results" / "suite_cells") == suite.cell_files(work)
    log = capsys.readouterr().out
    assert "mtl_cpu6: tuning 5/16, verdict 1/8 cells, 1.83 h of cell time; picks lora 3e-3" in log
    assert "bigbench_default: tuning 0/16, verdict 0/8 cells, 0.0 h of cell time; picks none yet" in log
    suite.main(["--sync", "--seeds", "3", "--work", str(work), "--out", str(tmp_path / "results")])
    assert "mtl_cpu6: tuning 5/16, verdict 2/12 cells, 2.83 h of cell time; picks lora 3e-3" in capsys.readouterr().out
    # a tie goes to the value listed first (3e-4, 1e-3, 3e-3, 1e-2 in the suite's order)
    tune["3e-4"]["accuracy"]["a"] = 0.6
    (work / "mtl_cpu6" / f"tune/{lr}=3e-4/cells/t3e-4.json").write_text(json.dumps(tune["3e-4"]))
    suite.main(["--sync", "--work", str(work), "--out", str(tmp_path / "results")])
    assert "mtl_cpu6: tuning 5/16, verdict 0/8 cells, 0.83 h of cell time; picks lora 3e-4" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [(["--sets", "mtl_cpu6,nope"], "--sets"), (["--sets", ","], "--sets"),
                                         (["--sync", "adapter.r=0"], "adapter.r")])
def test_bad_input_is_one_line_error(tmp_path, argv, match):
    suite = load_suite()
    with pytest.raises(SystemExit) as err:
        suite.main(argv + ["--work", str(tmp_path)])
    assert match in str(err.value) and "\n" not in str(err.value)


def test_seeds_below_one_are_refused(tmp_path, capsys):
    suite = load_suite()
    with pytest.raises(SystemExit):
        suite.main(["--sync", "--seeds", "0", "--work", str(tmp_path)])
    assert "--seeds" in capsys.readouterr().err


def test_agreement_compares_picks_and_orders_over_the_values_both_sides_trained():
    suite = load_suite()
    lr = "trainer.learning_rate="
    full = {"method": "lora", "picked": lr + "3e-4",
            "scores": {lr + "3e-4": 0.60, lr + "1e-3": 0.50, lr + "3e-3": 0.55}}
    short = {"method": "lora", "scores": {lr + "1e-3": 0.40, lr + "3e-3": 0.45}}
    a = suite.agreement(short, full)
    # 3e-4 was not trained at the short steps: the full side's pick among the checked values is 3e-3
    assert a["scores_full"] == {lr + "1e-3": 0.50, lr + "3e-3": 0.55}
    assert a["pick_short"] == a["pick_full"] == lr + "3e-3" and a["same_pick"] and a["same_order"]
    flipped = suite.agreement(dict(short, scores={lr + "1e-3": 0.47, lr + "3e-3": 0.45}), full)
    assert flipped["pick_short"] == lr + "1e-3" and not flipped["same_pick"] and not flipped["same_order"]
    tied = suite.agreement(dict(short, scores={lr + "1e-3": 0.45, lr + "3e-3": 0.45}), full)
    assert tied["pick_short"] == lr + "1e-3"  # a tie goes to the value listed first, as in tuning


@pytest.mark.slow
def test_rank_check_trains_tuning_cells_at_fewer_steps_and_reports_agreement(tiny_model_dir, data_root, tmp_path,
                                                                           capsys):
    """--quick tunes at 2 steps, so a check at --rank-steps 2 repeats the suite's tuning cells exactly (tune_2/):
    the same scores, picks and orders on both sides; --rank-steps 1 then trains tune_1/ cells only."""
    suite = load_suite()
    out, work = tmp_path / "results", tmp_path / "work"
    args = ["--quick", "--json", "--rank-check", "--sets", "mtl_cpu6", "--out", str(out), "--work", str(work),
            f"model.name_or_path={tiny_model_dir}", f"data.path={data_root / 'mtl_cpu6'}", "mlflow.enabled=false"]
    result = suite.main(args + ["--rank-steps", "2"])
    rows = result["mtl_cpu6"]
    assert [r["method"] for r in rows] == ["lora", "align"]
    assert all(r["scores_short"] == r["scores_full"] and r["same_pick"] and r["same_order"] for r in rows)
    stored = [str(p) for p in suite.cell_files(out / "suite_quick_cells")]
    assert sum(p.startswith("mtl_cpu6/tune/") for p in stored) == 4
    assert sum(p.startswith("mtl_cpu6/tune_2/") for p in stored) == 4
    log = capsys.readouterr().out
    assert json.loads(log.strip().splitlines()[-1])["figures"]["same_pick"]["value"] == 1.0
    assert "Same pick: 2 of 2" in (out / "suite_quick_rank_check.md").read_text()

    again = suite.main(args + ["--rank-steps", "1", "--rank-values", "3e-3,1e-3"])
    assert all(list(r["scores_short"]) == ["trainer.learning_rate=1e-3", "trainer.learning_rate=3e-3"]
               for r in again["mtl_cpu6"])
    assert capsys.readouterr().out.count("finished earlier: skipped") == 4  # the suite's tuning cells
    assert len(list((work / "mtl_cpu6" / "tune_1").glob("*/cells/*.json"))) == 4
    record = json.loads((out / "suite_quick_rank_check.json").read_text())
    assert (record["short_steps"], record["full_steps"]) == (1, 2)


@pytest.mark.parametrize("argv, match", [(["--rank-values", "1e-3"], "--rank-values"),
                                         (["--rank-steps", "50"], "--rank-steps"),
                                         (["--rank-check", "--sync"], "--sync"),
                                         (["--rank-check", "--rank-values", "1e-3"], "at least two"),
                                         (["--rank-check", "--rank-values", "1e-4,1e-3"], "values the suite tunes")])
def test_rank_check_flags_are_checked(tmp_path, argv, match):
    suite = load_suite()
    with pytest.raises(SystemExit) as err:
        suite.main(argv + ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert match in str(err.value) and "\n" not in str(err.value)
