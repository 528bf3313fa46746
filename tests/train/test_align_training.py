"""Align-LoRA through the one training loop (world size 1, tiny model): ``adapter.align_lambda`` weights the
alignment term and nothing else differs from LoRA; the term is logged to MLflow as ``train/align_loss``;
single-task micro-batches pair with the other tasks' remembered fits."""
import math
import time

import pytest
import torch

from helpers import run_config, tracked_run

STEPS = 4


def fit(model_dir, data_dir, tmp_path, run=None, **kw):
    """The Trainer after ``STEPS`` steps, with the alignment term of every step (``trainer.align_by_step``)."""
    from rlora.train.loop import Trainer
    from rlora.train.runtime import LocalRuntime

    base = dict(trainer__max_steps=STEPS, mlflow__enabled=False, diagnostics__enabled=False,
                eval__max_examples_per_task=1)
    cfg = run_config(model_dir, data_dir, tmp_path, **{**base, **kw})
    if run is not None:
        run.update(tracked_run(cfg, tmp_path, "align"))
    t = Trainer(cfg, LocalRuntime(None), {"run_name": "align", "started_at": time.time(), **(run or {})},
                progress=False)
    t.align_by_step = []
    step = t.train_step

    def recorded():
        out = step()
        t.align_by_step.append(t.align_loss)
        return out

    t.train_step = recorded
    t.fit()
    return t


def same(a, b):
    assert a.keys() == b.keys() and a
    return all(torch.equal(a[k], b[k]) for k in a)


def test_align_lambda_weights_the_alignment_term_and_nothing_else_differs_from_lora(tiny_model_dir, task_dir,
                                                                                      tmp_path):
    """Mixed batches of three tasks. λ = 0: the same losses and the same adapter as LoRA, bit for bit (the
    forward is LoRA's at every step and the loss is the only difference); the term is still measured. The
    default λ = 0.2 trains another adapter whose tasks' fits are closer than λ = 0's at every later step (step 1
    runs on the same initial weights: the same term), and the term reaches MLflow as ``train/align_loss``."""
    from mlflow.tracking import MlflowClient

    lora = fit(tiny_model_dir, task_dir, tmp_path / "lora", adapter__method="lora")
    zero = fit(tiny_model_dir, task_dir, tmp_path / "zero", adapter__method="align", adapter__align_lambda=0.0)
    assert lora.align_by_step == [None] * STEPS and lora.align_loss is None
    assert zero.loss_hist == lora.loss_hist and same(zero.adapter_state, lora.adapter_state)
    assert all(math.isfinite(v) and v > 0 for v in zero.align_by_step)

    run = {}
    pulled = fit(tiny_model_dir, task_dir, tmp_path / "pulled", run=run, adapter__method="align")
    assert pulled.cfg.adapter.align_lambda == 0.2
    assert not same(pulled.adapter_state, lora.adapter_state)
    assert pulled.align_by_step[0] == zero.align_by_step[0]
    assert all(p < z for p, z in zip(pulled.align_by_step[1:], zero.align_by_step[1:])), \
        (pulled.align_by_step, zero.align_by_step)
    history = MlflowClient(run["tracking_uri"]).get_metric_history(run["mlflow_run_id"], "train/align_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(i + 1, pytest.approx(v, rel=1e-6)) for i, v in enumerate(pulled.align_by_step)]


def test_single_task_micro_batches_pair_with_the_remembered_fits(tiny_model_dir, task_dir, tmp_path):
    """Homogeneous batches hold one task: step 1 has nothing to pair with (0, not NaN); from step 2 the task is
    compared with the remembered fits of the tasks seen before, so λ > 0 trains another adapter than LoRA's and
    pulls the fits closer than λ = 0 from step 3 (step 2 still starts from the same weights as λ = 0's)."""
    common = dict(sampler__batch_composition="homogeneous", adapter__method="align")
    zero = fit(tiny_model_dir, task_dir, tmp_path / "zero", adapter__align_lambda=0.0, **common)
    pulled = fit(tiny_model_dir, task_dir, tmp_path / "pulled", adapter__align_lambda=1.0, **common)
    assert zero.align_by_step[0] == pulled.align_by_step[0] == 0.0
    assert pulled.align_by_step[1] == zero.align_by_step[1] > 0
    assert all(p < z for p, z in zip(pulled.align_by_step[2:], zero.align_by_step[2:])), \
        (pulled.align_by_step, zero.align_by_step)
    layers = [m for m in pulled.engine.module.modules() if hasattr(m, "align_memory")]
    assert layers and all(sorted(m.align_memory) == [0, 1, 2] for m in layers)
    assert not same(pulled.adapter_state, zero.adapter_state)


def test_align_lambda_must_not_be_negative(tiny_model_dir, task_dir, tmp_path):
    from rlora.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="adapter.align_lambda must be >= 0, got -0.1"):
        run_config(tiny_model_dir, task_dir, tmp_path, adapter__method="align", adapter__align_lambda=-0.1)
