"""The one training loop: the local path (this process, world size 1) and a one-worker Ray Train run do
the same arithmetic, and the local path checkpoints and resumes like a worker (slow). The loop's knobs
each do what they say (fast, in this process: evaluation, diagnostics, checkpoints, autocast, threads)."""
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import rows_drawn, run_config, tracked_run
from rlora.train.launcher import run_training


def adapter(result):
    return load_file(str(Path(result.adapter_dir) / "rlora_adapter.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rlora", "mtl"])
def test_local_equals_one_ray_worker(local_ray, tiny_model_dir, task_dir, tmp_path, method):
    common = dict(adapter__method=method, adapter__dropout=0.1, ray__num_workers=1, trainer__max_steps=6,
                  trainer__save_steps=4, mlflow__enabled=False, trainer__gradient_accumulation_steps=2,
                  trainer__per_device_train_batch_size=2)
    ray_res = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "ray", trainer__run_name="r", **common))
    local_res = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "local", trainer__run_name="l",
                                        **common), local=True)
    assert len(ray_res.summary["train_loss"]) == 6
    assert local_res.summary["train_loss"] == ray_res.summary["train_loss"]
    diff = max_diff(adapter(ray_res), adapter(local_res))
    print(f"{method}: max |local - Ray| adapter difference {diff:.2e}")
    assert diff <= 1e-6
    assert local_res.summary["sampler_state"] == ray_res.summary["sampler_state"]
    assert local_res.summary["results_after"] == ray_res.summary["results_after"]
    # ray.num_workers=1 (2 by default, tests/train/test_trainer.py): one rank draws 6 steps x 2 micro-batches x 2 rows
    state = ray_res.summary["sampler_state"]
    assert state["fingerprint"]["world_size"] == 1 and rows_drawn(state) == 6 * 2 * 2 * 1


@pytest.mark.slow
def test_local_run_checkpoints_and_resumes(tiny_model_dir, task_dir, tmp_path):
    """A local run stopped after 4 of 6 steps and re-run with the same name continues from its checkpoint
    and ends with the adapter of a straight 6-step run (constant learning rate: the schedule does not
    depend on where the first run stopped)."""
    common = dict(adapter__dropout=0.1, trainer__save_steps=2, trainer__lr_scheduler_type="constant",
                  mlflow__enabled=False, ray__num_to_keep=1)
    straight = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "a", trainer__max_steps=6,
                                       trainer__run_name="s", **common), local=True)
    t0 = time.time()
    first = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "b", trainer__max_steps=4,
                                    trainer__run_name="c", **common), local=True)
    first_wall = time.time() - t0
    kept = sorted(p.name for p in (tmp_path / "b" / "ray_results" / "c").glob("checkpoint_*"))
    assert kept == ["checkpoint_000004"]  # ray.num_to_keep=1
    again = run_training(run_config(tiny_model_dir, task_dir, tmp_path / "b", trainer__max_steps=6,
                                    trainer__run_name="c", **common), local=True)
    assert first.summary["global_step"] == 4
    assert again.summary["resumed_from_step"] == 4 and again.summary["global_step"] == 6
    # the first piece's wall time (setup to its last checkpoint) carries over: a resumed run knows its whole time
    assert first.summary["wall_seconds_before"] == 0.0
    assert 0.0 < again.summary["wall_seconds_before"] <= first_wall
    assert again.summary["train_loss"] == straight.summary["train_loss"][4:]
    assert max_diff(adapter(straight), adapter(again)) <= 1e-6


# ---- the loop's knobs, in this process -------------------------------------------------------------
def knob_cfg(model_dir, data_dir, tmp_path, **kw):
    base = dict(trainer__max_steps=2, mlflow__enabled=False, diagnostics__enabled=False,
                eval__max_examples_per_task=2)
    base.update(kw)
    return run_config(model_dir, data_dir, tmp_path, **base)


def fit(cfg, model=None, **run):
    """Run the loop (world size 1, no checkpoints) and return the Trainer."""
    import time

    from rlora.train.loop import Trainer
    from rlora.train.runtime import LocalRuntime

    trainer = Trainer(cfg, LocalRuntime(None), {"run_name": "knobs", "started_at": time.time(), **run},
                      model=model, progress=False)
    trainer.fit()
    return trainer


def base_model(model_dir):
    from rlora.models import load_base_model

    return load_base_model(str(model_dir))


@pytest.mark.parametrize("before", [True, False])
def test_before_training_evaluates_the_untrained_adapter(tiny_model_dir, task_dir, tmp_path, before):
    t = fit(knob_cfg(tiny_model_dir, task_dir, tmp_path, eval__before_training=before))
    if before:
        assert set(t.results_before) == {"parity", "sign", "size"}
        assert all(r["n"] == 2 for r in t.results_before.values())
        assert t.results_before != t.results_after  # two steps changed the dev losses
    else:
        assert t.results_before is None


@pytest.fixture
def split_data(tmp_path):
    """Task folders with 5 dev rows and a 2-row test split per task."""
    from helpers import write_tasks

    import json

    root = write_tasks(tmp_path / "data", n_train=12, n_dev=5)
    for task in ("parity", "sign", "size"):
        rows = [json.loads(line) for line in (root / task / "dev.jsonl").read_text().splitlines()[:2]]
        (root / task / "test.jsonl").write_text("".join(json.dumps({**r, "id": r["id"] + "-test"}) + "\n"
                                                        for r in rows))
    return root


@pytest.mark.parametrize("split,rows", [("dev", 5), ("test", 2)])
def test_eval_split_picks_the_split(tiny_model_dir, split_data, tmp_path, split, rows):
    t = fit(knob_cfg(tiny_model_dir, split_data, tmp_path, eval__split=split, eval__max_examples_per_task="null"))
    assert {k: r["n"] for k, r in t.results_after.items()} == {"parity": rows, "sign": rows, "size": rows}


@pytest.fixture
def long_option_data(tmp_path):
    """One task whose gold option is 12 tokens long and the other option one token: summed log-probs
    always prefer the short option, per-token ones need not."""
    import json

    folder = tmp_path / "lengths" / "pick"
    folder.mkdir(parents=True)
    long = " ".join(["blue"] * 12)
    for split, n in (("train", 8), ("dev", 16)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{split}-{i}", "input": f"Pick number {i}.", "options": ["red", long],
                                    "target": long}) + "\n")
    return folder.parent


def test_length_normalized_scores_options_per_token(tiny_model_dir, long_option_data, tmp_path):
    from rlora.data import evaluate_tasks, load_tasks
    from rlora.models import load_tokenizer

    cfg = knob_cfg(tiny_model_dir, long_option_data, tmp_path, eval__length_normalized=True,
                   eval__max_examples_per_task="null", trainer__max_steps=1)
    t = fit(cfg)
    model, tok, dev = t.engine.module.eval(), load_tokenizer(str(tiny_model_dir)), load_tasks(cfg.data, "dev")
    direct = {norm: evaluate_tasks(model, tok, dev, ["pick"], max_length=cfg.data.max_length, progress=False,
                                   length_normalized=norm)["pick"]["correct"] for norm in (False, True)}
    assert direct[False] == 0 and direct[True] > 0, direct  # the data does separate the two scorings
    assert t.results_after["pick"]["correct"] == direct[True]


def count_eval_forwards(model):
    """Forwards of the decoder in eval mode (the scorer calls the decoder and the LM head itself)."""
    calls = []
    model.model.register_forward_hook(lambda m, args, out: calls.append(1) if not m.training else None)
    return calls


@pytest.mark.parametrize("batch", [1, 16])
def test_per_device_eval_batch_size_sets_the_rows_per_forward(tiny_model_dir, task_dir, tmp_path, batch):
    model = base_model(tiny_model_dir)
    calls = count_eval_forwards(model)
    fit(knob_cfg(tiny_model_dir, task_dir, tmp_path, trainer__per_device_eval_batch_size=batch,
                 eval__max_examples_per_task=4), model=model)
    # 3 tasks x 4 dev rows, scored together: the prompts' shared prefix (one row per task, at most `batch` rows a
    # forward: 3 forwards of 1, or 1 of 3), then two per batch of rows (their prompts, then their options):
    # 12 batches of 1 row, or 1 of 12
    prefix, batches = (3, 12) if batch == 1 else (1, 1)
    assert len(calls) == prefix + 2 * batches


def count_train_forwards(module):
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(1) if m.training else None)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_the_layers(tiny_model_dir, task_dir, tmp_path, checkpointing):
    model = base_model(tiny_model_dir)
    calls = count_train_forwards(model.model.layers[0].self_attn)  # inside the checkpointed block
    fit(knob_cfg(tiny_model_dir, task_dir, tmp_path, trainer__gradient_checkpointing=checkpointing,
                 trainer__max_steps=3), model=model)
    assert len(calls) == (6 if checkpointing else 3)  # the backward pass runs the layer again


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocasts_the_training_forward(tiny_model_dir, task_dir, tmp_path, bf16):
    model = base_model(tiny_model_dir)
    dtypes = set()
    model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda m, args, out: dtypes.add(out.dtype) if m.training else None)
    t = fit(knob_cfg(tiny_model_dir, task_dir, tmp_path, trainer__bf16=bf16), model=model)
    assert dtypes == {torch.bfloat16 if bf16 else torch.float32}
    # the weights and the loss stay in fp32
    assert {p.dtype for p in t.engine.module.parameters()} == {torch.float32}
    assert all(isinstance(x, float) for x in t.loss_hist)


@pytest.mark.parametrize("cpus", [1, 2])
def test_resources_per_worker_cpu_sets_the_torch_threads(tiny_model_dir, task_dir, tmp_path, cpus):
    import time

    from rlora.train.loop import Trainer
    from rlora.train.runtime import LocalRuntime

    before = torch.get_num_threads()
    cfg = knob_cfg(tiny_model_dir, task_dir, tmp_path, ray__resources_per_worker=f"{{CPU: {cpus}}}")
    try:
        torch.set_num_threads(3)
        Trainer(cfg, LocalRuntime(None), {"run_name": "t", "started_at": time.time()}, progress=False).setup_data()
        assert torch.get_num_threads() == cpus
    finally:
        torch.set_num_threads(before)


def metric_steps(run, key):
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(run["tracking_uri"]).get_metric_history(run["mlflow_run_id"], key))


@pytest.mark.parametrize("enabled,every,steps", [(True, 2, [2, 4, 5]), (True, 3, [3, 5]), (False, 2, [])])
def test_diagnostics_run_every_n_steps_unless_disabled(tiny_model_dir, task_dir, tmp_path, enabled, every, steps):
    cfg = knob_cfg(tiny_model_dir, task_dir, tmp_path, trainer__max_steps=5, diagnostics__enabled=enabled,
                   diagnostics__every_n_steps=every, mlflow__log_artifacts=False)
    run = tracked_run(cfg, tmp_path, "knobs")
    t = fit(cfg, **run)
    assert metric_steps(run, "diag/head_cos_B/mean") == steps  # and the last step
    assert metric_steps(run, "train/loss") == [1, 2, 3, 4, 5]
    assert hasattr(t, "_probe") == enabled


@pytest.mark.parametrize("rows", [1, 3])
def test_probe_batch_size_sets_the_probe_rows_per_task(tiny_model_dir, task_dir, tmp_path, rows):
    t = fit(knob_cfg(tiny_model_dir, task_dir, tmp_path, diagnostics__enabled=True, diagnostics__every_n_steps=1,
                     diagnostics__probe_batch_size=rows))
    assert {k: b["input_ids"].shape[0] for k, b in t._probe.items()} == {"parity": rows, "sign": rows, "size": rows}


def test_save_steps_sets_the_checkpoint_steps(tiny_model_dir, task_dir, tmp_path):
    from rlora.train.local import train_local

    for every, saved in ((2, [2, 4, 5]), (3, [3, 5])):
        ckpts = tmp_path / f"every{every}"
        train_local(knob_cfg(tiny_model_dir, task_dir, tmp_path, trainer__max_steps=5, trainer__save_steps=every,
                             ray__num_to_keep=10), progress=False, checkpoint_dir=str(ckpts))
        assert sorted(p.name for p in ckpts.glob("checkpoint_*")) == [f"checkpoint_{s:06d}" for s in saved]


def test_num_to_keep_keeps_the_newest_checkpoints(tiny_model_dir, task_dir, tmp_path):
    from rlora.train.local import train_local

    for keep in (1, 3):
        ckpts = tmp_path / f"keep{keep}"
        train_local(knob_cfg(tiny_model_dir, task_dir, tmp_path, trainer__max_steps=5, trainer__save_steps=1,
                             ray__num_to_keep=keep), progress=False, checkpoint_dir=str(ckpts))
        assert sorted(p.name for p in ckpts.glob("checkpoint_*")) == [f"checkpoint_{s:06d}" for s in range(6 - keep, 6)]


def test_progress_window_leaves_out_setup_and_side_work(monkeypatch):
    """The progress line's tok/s: the first window starts with the loop (not at setup), and time in
    diagnostics/evaluation/checkpoints is not counted as training time."""
    from rlora.train import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "time", lambda: now[0])
    clock = loop._Clock()
    now[0] = 160.0  # 60 s of setup
    clock.start_loop()
    now[0] = 170.0
    clock.step_done(500)
    with clock.side():
        now[0] = 185.0  # 15 s of diagnostics
    now[0] = 195.0
    clock.step_done(700)
    assert clock.window() == (1200, 20.0)  # 35 s since the loop started, 15 of them side work
    with clock.side():
        now[0] = 200.0  # a checkpoint after the progress line counts against no window
    now[0] = 204.0
    clock.step_done(300)
    assert clock.window() == (300, 4.0)
