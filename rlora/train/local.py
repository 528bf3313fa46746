"""Training in this process: the one training loop (:mod:`rlora.train.loop`) with world size 1.

:func:`train_local` is the Python entry the benchmarks and tests use: the same data path, sampler,
DeepSpeed engine (ZeRO stage as configured, a one-process gloo group), seeds and arithmetic as a Ray
worker of rank 0 in a one-worker run, without a driver, MLflow or checkpoints (``checkpoint_dir``
turns them on). ``rlora train --local`` runs the full driver (preflight, MLflow, checkpoints,
resume) in this process through :func:`rlora.train.launcher.run_training`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from ..config import RunConfig
from .loop import Trainer
from .runtime import LocalRuntime


def train_local(cfg: RunConfig, model=None, tokenizer=None, progress: bool = True, eval_before: bool = False,
                checkpoint_dir: Optional[str] = None) -> dict[str, Any]:
    """Train adapters on ``cfg``'s tasks in this process and evaluate them per task.

    Args:
        cfg: the run config (not modified; a copy gets ``adapter.tasks`` filled from the data).
        model: a base causal LM without adapters (default: loaded from ``cfg.model``); adapters are
            injected into it in place.
        tokenizer: default ``load_tokenizer(cfg.model.name_or_path)``.
        progress: print the ready line and a progress line every ``trainer.logging_steps`` steps.
        eval_before: evaluate before the first step (the base model's zero-shot accuracy: every
            method starts exactly at the base model); overrides ``eval.before_training``.
        checkpoint_dir: keep checkpoints there (``checkpoint_NNNNNN``) and resume from the newest.

    Returns the loop's summary (``results_before``, ``results_after``, ``time_to_first_step_s``,
    ``train_tokens_per_s``, ``trainable_params``, ``sampler_state``, ...) plus ``eval_history``
    (``[(step, results)]``), ``train_loss`` and ``task_loss`` (per optimizer step; NaN for an absent
    task), ``sampler_history``, ``tasks``, ``config`` (resolved), ``wall_s``, ``adapter_state`` (the
    adapter's tensors, gathered under ZeRO-3) and ``model`` (the trained model in eval mode).
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"train_local needs a rlora.config.RunConfig, got {type(cfg).__name__}")
    t0 = time.time()
    cfg = cfg.model_copy(deep=True)
    cfg.eval.before_training = bool(eval_before)
    run = {"run_name": cfg.trainer.run_name or "local", "started_at": time.time(), "storage_dir": checkpoint_dir}
    runtime = LocalRuntime(Path(checkpoint_dir) if checkpoint_dir else None, cfg.ray.num_to_keep)
    trainer = Trainer(cfg, runtime, run, model=model, tokenizer=tokenizer, progress=progress)
    summary = trainer.fit()
    trainer.engine.module.eval()
    return {**summary, "eval_history": trainer.eval_history, "train_loss": trainer.loss_hist,
            "task_loss": trainer.task_hist, "sampler_history": trainer.data.sampler.history,
            "tasks": trainer.data.names, "config": cfg.model_dump(mode="json"), "wall_s": time.time() - t0,
            "adapter_state": trainer.adapter_state, "model": trainer.engine.module}
