"""Feature combinations through the one training loop (in this process, world size 1, tiny model):
method x batch composition, each with gradient checkpointing, ZeRO stage, gradient accumulation and
bf16 autocast, alone and together. Equivalences are checked, not just "it runs":

* gradient checkpointing on/off: the same adapter (fp32, dropout on: the recompute replays the masks);
* ZeRO-2 and ZeRO-3 vs ZeRO-0: the same adapter (ZeRO-3 within 1e-4, see the test);
* 2 micro-batches of 2 rows vs 1 of 4 (mixed batches, round-robin: the same rows): the same adapter,
  since the loss is the mean over the optimizer step's answer tokens;
* bf16 autocast: per-step losses within 3 % of fp32.

The multi-process versions (2 Ray workers, ZeRO-0/2/3, resume) are in test_trainer.py and test_faults.py.
"""
import math

import pytest

from helpers import run_config
from rlora.train.local import train_local

METHODS = ["lora", "hydra", "rlora", "mtl"]


def train(model_dir, data_dir, tmp_path, **kw):
    base = dict(trainer__max_steps=3, trainer__learning_rate=1e-2, trainer__per_device_train_batch_size=4,
                trainer__warmup_ratio=0.0, sampler__strategy="round_robin", adapter__dropout=0.1,
                deepspeed__stage=0, mlflow__enabled=False, eval__max_examples_per_task=1,
                diagnostics__enabled=False)
    base.update(kw)
    out = train_local(run_config(model_dir, data_dir, tmp_path, **base), progress=False)
    return out["train_loss"], out["adapter_state"]


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("composition", ["mixed", "homogeneous"])
@pytest.mark.parametrize("method", METHODS)
def test_feature_matrix(tiny_model_dir, task_dir, tmp_path, method, composition):
    common = dict(adapter__method=method, sampler__batch_composition=composition)
    ref_loss, ref = train(tiny_model_dir, task_dir, tmp_path, **common)
    assert all(math.isfinite(x) for x in ref_loss) and len(ref_loss) == 3

    # gradient checkpointing: same arithmetic, recomputed (dropout masks replayed, task ids kept)
    loss, st = train(tiny_model_dir, task_dir, tmp_path, trainer__gradient_checkpointing=True, **common)
    assert max_diff(ref, st) <= 1e-6 and loss == pytest.approx(ref_loss, abs=1e-6)

    # ZeRO stages: partitioning does not change the update. ZeRO-3 sums gradients in another order;
    # where a gradient is near 0 (MTL-LoRA's mixing logits w_t while B is still ~0) AdamW's g/sqrt(v)
    # turns that rounding into up to ~1e-4 of the weight (seen: 8e-5 for mtl, homogeneous batches)
    for stage, tol in ((2, 1e-5), (3, 1e-4)):
        loss, st = train(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=stage, **common)
        assert max_diff(ref, st) <= tol, stage
        assert loss == pytest.approx(ref_loss, abs=1e-5)

    # bf16 autocast: close to fp32
    loss, _ = train(tiny_model_dir, task_dir, tmp_path, trainer__bf16=True, **common)
    assert all(math.isfinite(x) for x in loss)
    assert loss == pytest.approx(ref_loss, rel=3e-2)

    # all together
    loss, _ = train(tiny_model_dir, task_dir, tmp_path, trainer__bf16=True, trainer__gradient_checkpointing=True,
                    deepspeed__stage=3, trainer__gradient_accumulation_steps=2,
                    trainer__per_device_train_batch_size=2, **common)
    assert len(loss) == 3 and all(math.isfinite(x) for x in loss)


@pytest.mark.parametrize("method", METHODS)
def test_accumulation_equals_the_larger_batch(tiny_model_dir, task_dir, tmp_path, method):
    """Round-robin mixed batches give micro-batches 2+2 the same rows as one batch of 4; with dropout off
    the update is the same (the answer-token counts of the two halves differ, so a per-micro-batch mean
    would not be)."""
    common = dict(adapter__method=method, adapter__dropout=0.0)
    ref_loss, ref = train(tiny_model_dir, task_dir, tmp_path, **common)
    for stage in (0, 2):
        loss, st = train(tiny_model_dir, task_dir, tmp_path, trainer__gradient_accumulation_steps=2,
                         trainer__per_device_train_batch_size=2, deepspeed__stage=stage, **common)
        assert max_diff(ref, st) <= 1e-5
        assert loss == pytest.approx(ref_loss, abs=1e-5)


def test_embedded_model_smoke(task_dir, tmp_path):
    """The embedded SmolLM2-135M with MTL-LoRA, gradient checkpointing, 2 micro-batches, bf16 autocast and
    ZeRO-2: two optimizer steps with finite losses that move the adapter."""
    from rlora.config import validate_config

    cfg = validate_config({
        "adapter": {"method": "mtl", "r": 4, "num_heads": 2, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(task_dir), "max_length": 64},
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                    "gradient_checkpointing": True, "bf16": True, "learning_rate": 1e-3, "output_dir": str(tmp_path)},
        "deepspeed": {"stage": 2}, "mlflow": {"enabled": False}, "diagnostics": {"enabled": False},
        "eval": {"max_examples_per_task": 1, "before_training": False}})
    out = train_local(cfg, progress=False)
    assert len(out["train_loss"]) == 2 and all(math.isfinite(x) for x in out["train_loss"])
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in out["adapter_state"].items())
