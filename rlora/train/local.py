"""Single-process training: the distributed worker's data path without Ray or DeepSpeed.

:func:`train_local` runs the same steps as :func:`rlora.train.worker.train_loop_per_worker` with
``world_size = 1`` -- load and tokenise the tasks, inject adapters (seeded), draw micro-batches with
the :class:`~rlora.sampler.TaskSampler`, left-pad them (:func:`~rlora.train.batches.left_padded_batch`),
take the per-task loss (:func:`~rlora.train.batches.forward_loss`), feed the per-task means back to
the sampler, and evaluate every task on its dev split -- but optimises with a plain torch ``AdamW``
over the adapter parameters:

* optimizer step ``k`` (0-based) uses ``lr_k = learning_rate * lr_lambda(k)`` (the schedule of
  :func:`rlora.train.engine.lr_lambda`, stepped once per optimizer step);
* with ``G = gradient_accumulation_steps`` micro-batches per step, each micro-batch loss is divided
  by ``G`` before ``backward`` (as DeepSpeed does), so the accumulated gradient is the mean of the
  micro-batch gradients;
* the global gradient norm is clipped to ``max_grad_norm`` (no clipping when it is 0);
* the sampler receives ``L_t = sum_t / count_t`` over the step's ``G`` micro-batches (NaN for a task
  absent from the step).

There is no checkpointing, fault injection or MLflow here; benchmarks and tests use it to compare
methods and samplers on one machine.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch

from ..config import ConfigError, RunConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _resolve_tasks(cfg: RunConfig) -> list[str]:
    """The task names in task-id order; ``adapter.tasks`` is filled from the data when empty."""
    from ..data import task_names

    names = task_names(cfg.data)
    if not cfg.adapter.tasks:
        cfg.adapter.tasks = names
    elif list(cfg.adapter.tasks) != names:
        raise ConfigError(f"adapter.tasks {list(cfg.adapter.tasks)} differ from the data's tasks {names}: "
                          "remove adapter.tasks or list the same tasks in the same order")
    return names


def _evaluate(model, tokenizer, cfg: RunConfig, dev: dict, names: list[str], progress: bool) -> dict:
    from ..data import evaluate_tasks, prompt_templates

    return evaluate_tasks(model, tokenizer, dev, names, batch_size=cfg.trainer.per_device_eval_batch_size,
                          length_normalized=cfg.eval.length_normalized, max_length=cfg.data.max_length,
                          use_chat_template=cfg.data.use_chat_template, templates=prompt_templates(cfg.data),
                          max_examples_per_task=cfg.eval.max_examples_per_task, progress=progress)


def train_local(cfg: RunConfig, model=None, tokenizer=None, progress: bool = True,
                eval_before: bool = False) -> dict[str, Any]:
    """Train adapters on ``cfg``'s tasks in this process and evaluate them per task.

    Args:
        cfg: the run config (not modified; a copy gets ``adapter.tasks`` filled from the data).
        model: a base causal LM without adapters (default: ``load_base_model(cfg.model.name_or_path)``);
            adapters are injected into it in place.
        tokenizer: default ``load_tokenizer(cfg.model.name_or_path)``.
        progress: print a log line every ``trainer.logging_steps`` steps and show eval progress bars.
        eval_before: also evaluate before the first step (with zero-initialised up-projections, or
            R-LoRA's zero-start offset, this is the base model's zero-shot accuracy).

    Returns a dict with ``results_before`` (``None`` unless ``eval_before``), ``results_after``
    (``task -> {"accuracy", "n", "loss", ...}``), ``eval_history`` (``[(step, results)]`` for
    ``eval.every_n_steps``), ``train_loss`` (mean answer-token loss per optimizer step),
    ``task_loss`` (per step, per task; NaN when absent), ``train_tokens_per_s`` (non-padding tokens per
    second after the first step; ``None`` for a one-step run), ``time_to_first_step_s`` (from the call
    to the end of step 1, loading included), ``train_time_s``, ``eval_time_s``, ``total_steps``,
    ``trainable_params``, ``sampler_history`` (the sampler's re-weightings), ``tasks``, ``config``
    (the resolved config as a dict) and ``model`` (the trained model, in eval mode).
    """
    from ..data import load_tasks, prompt_templates, tokenize_tasks, truncation_counts
    from ..inject import count_parameters, inject
    from ..models import load_base_model, load_tokenizer
    from ..sampler import TaskSampler
    from .batches import forward_loss, next_micro_batch, sampler_config
    from .engine import lr_lambda

    t_start = time.time()
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"train_local needs a rlora.config.RunConfig, got {type(cfg).__name__}")
    cfg = cfg.model_copy(deep=True)
    names = _resolve_tasks(cfg)
    t = cfg.trainer
    ga = t.gradient_accumulation_steps

    # ---- data and sampler
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.name_or_path)
    train = load_tasks(cfg.data, "train")
    dev = load_tasks(cfg.data, cfg.eval.split)
    tokenized = tokenize_tasks(tokenizer, train, cfg.data.max_length, cfg.data.use_chat_template,
                               prompt_templates(cfg.data))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = TaskSampler([len(tokenized[n]) for n in names], sampler_config(cfg),
                          batch_size=t.per_device_train_batch_size,
                          rank=0, world_size=1, seed=t.seed, task_names=names,
                          max_steps=t.max_steps * ga if t.max_steps else None, num_epochs=t.num_train_epochs)
    total_steps = t.max_steps or max(1, math.ceil(sampler.total_steps / ga))

    # ---- model and adapters
    if model is None:
        model = load_base_model(cfg.model.name_or_path, dtype=_DTYPES[cfg.model.torch_dtype],
                                trust_remote_code=cfg.model.trust_remote_code)
        if cfg.ray.use_gpu and torch.cuda.is_available():
            model = model.to("cuda")
    device = next(model.parameters()).device
    torch.manual_seed(t.seed)  # the adapter init depends on the seed only
    inject(model, cfg.adapter)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, _ = count_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    results_before = None
    eval_time = 0.0
    if eval_before and dev:
        t0 = time.time()
        results_before = _evaluate(model, tokenizer, cfg, dev, names, progress)
        eval_time += time.time() - t0
    torch.manual_seed(t.seed * 1000)  # dropout stream of rank 0, as in the distributed worker
    if progress:
        print(f"[rlora] local: ready in {time.time() - t_start:.1f}s ({len(names)} tasks, "
              f"{sum(map(len, tokenized.values()))} train rows, {total_steps} steps, method {cfg.adapter.method}, "
              f"{trainable:,} trainable parameters)", flush=True)

    # ---- train
    T = len(names)
    model.train()
    loss_hist: list[float] = []
    task_hist: list[list[float]] = []
    eval_history: list[tuple[int, dict]] = []
    first_step_s: Optional[float] = None
    train_tokens, train_t0 = 0, None
    window_tokens, window_t0 = 0, time.time()
    loop_t0, mid_eval = time.time(), 0.0
    for step in range(1, total_steps + 1):
        sums = torch.zeros(T)
        counts = torch.zeros(T)
        for _ in range(ga):
            batch = next_micro_batch(sampler, tokenized, names, pad_id, device)
            loss, s, c = forward_loss(model, batch, T)
            (loss / ga).backward()
            sums += s.float().cpu()
            counts += c.float().cpu()
            window_tokens += batch["tokens"]
            if train_t0 is not None:
                train_tokens += batch["tokens"]
        if t.max_grad_norm and t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if first_step_s is None:
            first_step_s = time.time() - t_start
            train_t0 = time.time()  # steady-state throughput excludes the first step

        task_loss = [float(x / c) if c > 0 else float("nan") for x, c in zip(sums.tolist(), counts.tolist())]
        sampler.update(task_loss)
        loss_hist.append(float(sums.sum() / counts.sum().clamp(min=1)))
        task_hist.append(task_loss)

        if progress and (step % t.logging_steps == 0 or step == total_steps):
            now = time.time()
            tps = window_tokens / max(now - window_t0, 1e-9)
            window_tokens, window_t0 = 0, now
            spent = now - loop_t0
            eta = (total_steps - step) * spent / step
            print(f"[rlora] step {step:>5d}/{total_steps} {100 * step / total_steps:5.1f}% | loss {loss_hist[-1]:.4f} | "
                  f"{tps:,.0f} tok/s | lr {schedule.get_last_lr()[0]:.2e} | elapsed {_fmt_time(spent)} | "
                  f"ETA {_fmt_time(eta)}", flush=True)
        if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and step < total_steps and dev:
            t0 = time.time()
            eval_history.append((step, _evaluate(model, tokenizer, cfg, dev, names, False)))
            eval_time += time.time() - t0
            mid_eval += time.time() - t0
            train_t0 = None if train_t0 is None else train_t0 + (time.time() - t0)
    train_end = time.time()
    train_elapsed = (train_end - train_t0) if (train_t0 is not None and total_steps > 1) else None

    # ---- evaluate
    model.eval()
    results_after: dict = {}
    if dev:
        t0 = time.time()
        results_after = _evaluate(model, tokenizer, cfg, dev, names, progress)
        eval_time += time.time() - t0
    return {
        "results_before": results_before,
        "results_after": results_after,
        "eval_history": eval_history,
        "train_loss": loss_hist,
        "task_loss": task_hist,
        "train_tokens_per_s": train_tokens / max(train_elapsed, 1e-9) if train_elapsed else None,
        "time_to_first_step_s": first_step_s,
        "train_time_s": train_end - loop_t0 - mid_eval,
        "eval_time_s": eval_time,
        "total_steps": total_steps,
        "trainable_params": trainable,
        "truncated": truncation_counts(tokenized),
        "sampler_history": sampler.history,
        "tasks": names,
        "config": cfg.model_dump(mode="json"),
        "model": model,
    }
