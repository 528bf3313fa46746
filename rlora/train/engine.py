"""DeepSpeed: the ds_config built from our config, and the engine around an adapted model.

CPU notes (documented in the README):
* DeepSpeed JIT-compiles a shared-memory allreduce kernel (``deepspeed_shm_comm``) the first time its
  communication backend is created (~70 s on 2 cores). On CPU we mark that op unavailable before
  ``deepspeed.initialize`` so its collectives go through the gloo process group Ray Train created —
  no compile, no extra process group.
* The optimizer is a torch ``AdamW`` client optimizer (``zero_allow_untested_optimizer``), so neither
  fused nor CPU Adam has to be compiled.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..config import RunConfig


def ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    t, d = cfg.trainer, cfg.deepspeed
    zero: dict[str, Any] = {"stage": d.stage}
    if d.stage >= 1:
        zero.update(overlap_comm=d.overlap_comm, contiguous_gradients=True, reduce_scatter=True)
    if d.offload_optimizer:  # the config refuses offloading at a stage that cannot do it
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.ray.use_gpu}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.ray.use_gpu}
    if d.stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": False},  # trainer.bf16 is autocast around the forward (fp32 adapter + optimizer)
        "fp16": {"enabled": False},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return _merge(conf, d.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def avoid_cpu_shm_compile() -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory allreduce op (see module doc)."""
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_comm() -> None:
    """Create DeepSpeed's communication backend on top of the process group Ray Train created."""
    import deepspeed
    import torch.distributed as dist

    avoid_cpu_shm_compile()
    backend = dist.get_backend() if dist.is_initialized() else None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def lr_lambda(cfg: RunConfig, total_steps: int):
    """The HF schedules by name (linear, cosine, constant, constant_with_warmup) as a LambdaLR factor."""
    t = cfg.trainer
    warmup = int(math.ceil(t.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if t.lr_scheduler_type != "constant" and step < warmup:
            return (step + 1) / max(1, warmup)
        if t.lr_scheduler_type in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if t.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


def load_model(cfg: RunConfig, ds_conf: dict):
    """The base model in ``model.torch_dtype``; under ZeRO-3 partitioned while it loads."""
    from ..models import load_base_model

    kw = dict(dtype=cfg.model.torch_dtype, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.deepspeed.stage != 3:
        model = load_base_model(cfg.model.name_or_path, **kw)
        return model.to("cuda") if cfg.ray.use_gpu and torch.cuda.is_available() else model
    # HF from_pretrained builds the model under deepspeed.zero.Init, so every rank holds only its
    # partition of the base weights from the start.
    return load_base_model(cfg.model.name_or_path, zero3_config=ds_conf, **kw)


def build_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int, total_steps: int):
    """Wrap the adapted model in a DeepSpeed engine with AdamW over the adapter parameters only."""
    import deepspeed

    init_comm()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.trainer.learning_rate, weight_decay=cfg.trainer.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=ds_config(cfg, world_size), dist_init_required=False)
    return engine, opt, sched
