"""The DeepSpeed side of a run (rlora.train.engine): the ds_config built from the deepspeed and trainer
sections, the engine built from it, the AdamW optimizer and LR schedule, and the base model's dtype and
loading options. Real DeepSpeed engines in this process (world size 1) on a tiny random Llama."""
import json
import math
import re

import pytest
import torch
from deepspeed.runtime.zero.utils import ZeRORuntimeException

from helpers import run_config
from rlora.config import ConfigError
from rlora.train.engine import build_engine, ds_config, load_model, lr_lambda
from rlora.train.local import train_local

TASKS = "[parity, sign, size]"


@pytest.fixture(autouse=True)
def _process_group():
    from rlora.train.runtime import init_single_process_group

    init_single_process_group()


def cfg_for(model_dir, task_dir, tmp_path, **kw):
    return run_config(model_dir, task_dir, tmp_path, mlflow__enabled=False, diagnostics__enabled=False,
                      adapter__tasks=TASKS, **kw)


def engine_for(cfg, total_steps=10):
    from rlora.inject import inject

    model = load_model(cfg, ds_config(cfg, 1))
    torch.manual_seed(cfg.trainer.seed)
    inject(model, cfg.adapter)
    return build_engine(model, cfg, 1, total_steps)[0]


def one_step(model_dir, task_dir, tmp_path, **kw):
    """The lora adapter after one optimizer step (B starts at 0, so A gets no gradient in that step)."""
    base = dict(adapter__method="lora", trainer__max_steps=1, trainer__warmup_ratio=0.0,
                trainer__lr_scheduler_type="constant", trainer__max_grad_norm=1e6, eval__max_examples_per_task=1)
    base.update(kw)
    return train_local(cfg_for(model_dir, task_dir, tmp_path, **base), progress=False)["adapter_state"]


def tensors(state, suffix):
    keys = sorted(k for k in state if k.endswith(suffix))
    assert keys
    return torch.cat([state[k].flatten() for k in keys])


# ---- the deepspeed section ---------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_sets_the_engine_zero_stage(tiny_model_dir, task_dir, tmp_path, stage):
    eng = engine_for(cfg_for(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=stage))
    assert eng.zero_optimization_stage() == stage
    optimizer = {0: "AdamW", 1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer",
                 3: "DeepSpeedZeroOptimizer_Stage3"}[stage]
    assert type(eng.optimizer).__name__ == optimizer
    adapter = [p for p in eng.module.parameters() if p.requires_grad]
    # ZeRO-3 partitions the parameters themselves: each rank holds a shard, the module an empty tensor
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in adapter) == (stage == 3)



def test_offload_optimizer_offloads_the_optimizer_state(tiny_model_dir, task_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=2, deepspeed__offload_optimizer=True)
    assert ds_config(cfg, 1)["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "offload_optimizer" not in ds_config(cfg_for(tiny_model_dir, task_dir, tmp_path), 1)["zero_optimization"]
    eng = engine_for(cfg)
    assert eng.zero_cpu_offload()
    assert not engine_for(cfg_for(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=2)).zero_cpu_offload()


def test_offload_param_offloads_zero3_parameters(tiny_model_dir, task_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=3, deepspeed__offload_param=True)
    assert ds_config(cfg, 1)["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert engine_for(cfg).zero_offload_param().device == "cpu"
    assert engine_for(cfg_for(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=3)).zero_offload_param() is None


@pytest.mark.parametrize("overlap", [False, True])
def test_overlap_comm_reaches_the_engine(tiny_model_dir, task_dir, tmp_path, overlap):
    cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=2, deepspeed__overlap_comm=overlap)
    assert ds_config(cfg, 1)["zero_optimization"]["overlap_comm"] is overlap
    assert engine_for(cfg).zero_overlap_comm() is overlap


def test_extra_is_merged_into_the_ds_config_and_reaches_the_engine(tiny_model_dir, task_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, deepspeed__stage=2,
                  deepspeed__extra="{steps_per_print: 7, zero_optimization: {reduce_bucket_size: 12345}}")
    conf = ds_config(cfg, 1)
    assert conf["steps_per_print"] == 7
    # nested sections are merged key by key: the generated stage and flags stay
    assert conf["zero_optimization"]["reduce_bucket_size"] == 12345 and conf["zero_optimization"]["stage"] == 2
    eng = engine_for(cfg)
    assert eng.steps_per_print() == 7 and eng.zero_reduce_bucket_size() == 12345 and eng.zero_optimization_stage() == 2
    assert engine_for(cfg_for(tiny_model_dir, task_dir, tmp_path)).steps_per_print() == 10 ** 9


# ---- the optimizer and the schedule ------------------------------------------------------------
def test_learning_rate_scales_the_first_update(tiny_model_dir, task_dir, tmp_path):
    """AdamW's first step moves each weight by lr * g / (|g| + eps): twice the lr, twice the step."""
    b1 = tensors(one_step(tiny_model_dir, task_dir, tmp_path, trainer__learning_rate=1e-3), "lora_B")
    b2 = tensors(one_step(tiny_model_dir, task_dir, tmp_path, trainer__learning_rate=2e-3), "lora_B")
    assert b1.abs().max().item() == pytest.approx(1e-3, rel=1e-3)
    torch.testing.assert_close(b2, 2 * b1, rtol=1e-5, atol=1e-9)


def test_weight_decay_shrinks_the_weights(tiny_model_dir, task_dir, tmp_path):
    """Decoupled decay: A (no gradient in step 1, as B = 0) becomes A * (1 - lr * weight_decay); 0 leaves it."""
    a0 = tensors(one_step(tiny_model_dir, task_dir, tmp_path, trainer__learning_rate=1e-2), "lora_A")
    a1 = tensors(one_step(tiny_model_dir, task_dir, tmp_path, trainer__learning_rate=1e-2,
                          trainer__weight_decay=5.0), "lora_A")
    torch.testing.assert_close(a1, a0 * (1 - 1e-2 * 5.0), rtol=1e-6, atol=0)


def test_max_grad_norm_clips_the_gradient(tiny_model_dir, task_dir, tmp_path):
    """With the gradient clipped to norm 1e-9, AdamW's first step g / (|g| + 1e-8) is at most ~0.1 lr;
    unclipped it is ~lr for every weight with a real gradient."""
    lr = 1e-3
    free = tensors(one_step(tiny_model_dir, task_dir, tmp_path, trainer__learning_rate=lr), "lora_B")
    clipped = tensors(one_step(tiny_model_dir, task_dir, tmp_path, trainer__learning_rate=lr,
                               trainer__max_grad_norm=1e-9), "lora_B")
    assert free.abs().max().item() == pytest.approx(lr, rel=1e-3)
    assert clipped.abs().max().item() <= 0.11 * lr
    cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, trainer__max_grad_norm=0.25)
    assert ds_config(cfg, 1)["gradient_clipping"] == 0.25 and engine_for(cfg).gradient_clipping() == 0.25


LAMBDAS = {  # total 10 steps, warmup_ratio 0.2 -> 2 warmup steps
    "linear": [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0],
    "cosine": [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)],
    "constant": [1.0] * 11,
    "constant_with_warmup": [0.5, 1.0] + [1.0] * 9,
}


@pytest.mark.parametrize("schedule", sorted(LAMBDAS))
def test_lr_scheduler_type_and_warmup_ratio_shape_the_schedule(tiny_model_dir, task_dir, tmp_path, schedule):
    cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, trainer__lr_scheduler_type=schedule, trainer__warmup_ratio=0.2)
    f = lr_lambda(cfg, 10)
    assert [f(s) for s in range(11)] == pytest.approx(LAMBDAS[schedule], abs=1e-12)


@pytest.mark.parametrize("schedule,warmup,factors", [("cosine", 0.5, [1.0, 1.0, 0.5, 0.0]),
                                                     ("linear", 0.0, [0.75, 0.5, 0.25, 0.0]),
                                                     ("constant", 0.5, [1.0, 1.0, 1.0, 1.0])])
def test_the_engine_follows_the_schedule(tiny_model_dir, task_dir, tmp_path, capsys, schedule, warmup, factors):
    """The learning rate the engine reports after each of 4 optimizer steps (the progress lines)."""
    cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, trainer__max_steps=4, trainer__logging_steps=1,
                  trainer__learning_rate=4e-3, trainer__lr_scheduler_type=schedule, trainer__warmup_ratio=warmup,
                  eval__max_examples_per_task=1)
    train_local(cfg, progress=True)
    lrs = [float(m) for m in re.findall(r"\| lr ([0-9.e+-]+) \|", capsys.readouterr().out)]
    assert lrs == pytest.approx([4e-3 * f for f in factors], abs=1e-6)


# ---- the base model ----------------------------------------------------------------------------
def test_torch_dtype_sets_the_base_model_dtype(tiny_model_dir, task_dir, tmp_path):
    for dtype in ("bfloat16", "float16", "float32"):
        cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, model__torch_dtype=dtype, ray__use_gpu=True)
        model = load_model(cfg, ds_config(cfg, 1))
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    with pytest.raises(ConfigError, match="model.torch_dtype=bfloat16 needs a GPU"):
        cfg_for(tiny_model_dir, task_dir, tmp_path, model__torch_dtype="bfloat16")


def remote_code_model(root):
    """A model folder whose config names its own classes (auto_map), as hub models with custom code do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = root / "rlora_remote_code_toy"
    d.mkdir()
    (d / "configuration_toy.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass ToyConfig(LlamaConfig):\n    model_type = 'rlora_toy'\n")
    (d / "modeling_toy.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_toy import ToyConfig\n\n\n"
        "class ToyForCausalLM(LlamaForCausalLM):\n    config_class = ToyConfig\n")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
    conf = json.loads((d / "config.json").read_text())
    conf.update(model_type="rlora_toy", architectures=["ToyForCausalLM"],
                auto_map={"AutoConfig": "configuration_toy.ToyConfig",
                          "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"})
    (d / "config.json").write_text(json.dumps(conf))
    return d


def test_trust_remote_code_runs_the_model_folders_own_code(task_dir, tmp_path):
    from rlora.models import ModelLoadError

    folder = remote_code_model(tmp_path)
    cfg = cfg_for(folder, task_dir, tmp_path, model__trust_remote_code=True)
    assert type(load_model(cfg, ds_config(cfg, 1))).__name__ == "ToyForCausalLM"
    cfg = cfg_for(folder, task_dir, tmp_path)
    with pytest.raises(ModelLoadError, match="trust_remote_code=true"):
        load_model(cfg, ds_config(cfg, 1))
