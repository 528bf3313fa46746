"""The training function every Ray Train worker runs: one DeepSpeed engine per worker.

Per worker: load the base model (partitioned at load time under ZeRO-3), inject adapters, build the
task sampler, restore the latest checkpoint if Ray hands one over, then train with gradient
accumulation; checkpoint every ``trainer.save_steps``; evaluate per task on the dev split, sharded
over ranks; export the adapter from rank 0.

Every rank calls ``ray.train.report`` the same number of times (once per checkpoint) and every
collective (loss all-reduce, ZeRO-3 gathers, eval gathers) runs on all ranks.

Momentum note: AdamW keeps moving a task's private parameters (MTL-LoRA's Λ_t and w_t) by their
momentum in steps where that task is absent from the batch. With ``mixed`` batches every task is in
nearly every optimizer step, so this is rare; we keep plain AdamW semantics and document it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..distributed import all_reduce_sum, gather_objects, is_rank0, rank0_print


def _load_model(cfg: RunConfig, ds_conf: dict):
    from ..models import load_base_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.torch_dtype]
    if cfg.deepspeed.stage == 3:
        # HF from_pretrained builds the model under deepspeed.zero.Init while this object is alive,
        # so every rank holds only its partition of the base weights from the start.
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_conf)  # noqa: F841  (must stay referenced during loading)
        model = load_base_model(cfg.model.name_or_path, dtype=dtype)
        model._rlora_hf_ds_config = keep
        return model
    return load_base_model(cfg.model.name_or_path, dtype=dtype)


@contextlib.contextmanager
def gathered(model, stage: int):
    """Under ZeRO-3, gather the adapter parameters on every rank (a collective) for reading."""
    if stage != 3:
        yield
        return
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _evaluate(model, tokenizer, cfg: RunConfig, dev: dict, names: list[str], rank: int, world: int) -> dict:
    from ..data import evaluate_tasks, merge_metrics, prompt_templates

    model.eval()
    with torch.no_grad():
        part = evaluate_tasks(model, tokenizer, dev, names, batch_size=cfg.trainer.per_device_eval_batch_size,
                              length_normalized=cfg.eval.length_normalized, max_length=cfg.data.max_length,
                              use_chat_template=cfg.data.use_chat_template, templates=prompt_templates(cfg.data),
                              max_examples_per_task=cfg.eval.max_examples_per_task, rank=rank, world_size=world,
                              progress=False)
    model.train()
    parts = gather_objects(part)
    return {t: merge_metrics([p[t] for p in parts]) for t in dev}


def _diagnostics(engine, cfg: RunConfig, probe: dict, names: list[str], sampler, tracker, step: int):
    """Head diagnostics on every rank (identical inputs → identical results; no rank-0-only autograd
    under DeepSpeed's hooks); rank 0 logs metrics and plots. Returns the [T, T] task-conflict matrix."""
    from ..tracking.diagnostics import run_diagnostics

    stage3 = cfg.deepspeed.stage == 3
    with gathered(engine.module, cfg.deepspeed.stage):
        # under ZeRO-3 the probe runs forward-only (router usage): per-task autograd.grad through
        # partitioned parameters is not supported, so the interference matrix is left out there
        diag = run_diagnostics(engine.module, probe, names, interference=not stage3)
    engine.module.train()
    if tracker:
        tracker.log_metrics(diag.metrics(), step)
        with tempfile.TemporaryDirectory(prefix="rlora-diag-") as d:
            from ..tracking.plots import save_diagnostic_plots

            save_diagnostic_plots(diag, d, history=sampler.history)
            tracker.log_artifacts(d, f"diagnostics/step_{step:06d}")
    return diag.conflict


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import ray
    import ray.train

    from ..data import load_tasks, prompt_templates, tokenize_tasks, truncation_counts
    from ..inject import inject
    from ..models import load_tokenizer
    from ..sampler import TaskSampler
    from . import checkpoint as ckpt
    from .batches import forward_loss, next_micro_batch, sampler_config
    from .engine import build_engine, ds_config, init_comm

    cfg = RunConfig.model_validate(payload["config"])
    run: dict[str, Any] = payload["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = int(cfg.ray.resources_per_worker.get("CPU", 1))
    torch.set_num_threads(max(1, threads))
    t_start = time.time()

    # ---- data and sampler (identical on every rank; each rank takes its slice of every global batch)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    names = list(cfg.adapter.tasks)
    train = load_tasks(cfg.data, "train")
    dev = load_tasks(cfg.data, cfg.eval.split)
    tokenized = tokenize_tasks(tokenizer, train, cfg.data.max_length, cfg.data.use_chat_template,
                               templates=prompt_templates(cfg.data))
    truncated = truncation_counts(tokenized)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t = cfg.trainer
    ga = t.gradient_accumulation_steps
    sampler = TaskSampler([len(tokenized[n]) for n in names], sampler_config(cfg),
                          batch_size=t.per_device_train_batch_size,
                          rank=rank, world_size=world, seed=t.seed, task_names=names,
                          max_steps=t.max_steps * ga if t.max_steps else None, num_epochs=t.num_train_epochs)
    total_steps = t.max_steps or max(1, math.ceil(sampler.total_steps / ga))

    # ---- model, adapters, engine
    init_comm()
    ds_conf = ds_config(cfg, world)
    model = _load_model(cfg, ds_conf)
    torch.manual_seed(t.seed)  # identical adapter init on every rank
    inject(model, cfg.adapter)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    engine, _, _ = build_engine(model, cfg, world, total_steps)
    torch.manual_seed(t.seed * 1000 + rank)  # per-rank dropout streams

    # ---- resume
    global_step, results_before, resumed_from = 0, None, None
    with contextlib.ExitStack() as stack:
        # Candidates: the checkpoint Ray hands over (after a worker-group restart; it can lag behind
        # when the group failed right after a report), the newest complete checkpoint of this run in
        # storage (Ray hands none over after a driver restart), else the driver's explicit choice.
        # Every rank sees the same candidates and takes the one with the highest step.
        cands = []
        ray_ckpt = ray.train.get_checkpoint()
        if ray_ckpt is not None:
            cands.append(Path(stack.enter_context(ray_ckpt.as_directory())))
        storage_dir = Path(run["storage_dir"])
        local = ckpt.latest_in(storage_dir, world) if storage_dir.is_dir() else None
        if local and not (t.resume_from_checkpoint == "never" and local.stat().st_mtime < run["started_at"]):
            cands.append(local)
        if not cands and run.get("resume_from"):
            cands.append(Path(run["resume_from"]))
        resume_dir = max(cands, key=lambda p: ckpt.read_state(p)["global_step"]) if cands else None
        if resume_dir is not None:
            state = ckpt.load(engine, resume_dir, rank)
            global_step = resumed_from = int(state["global_step"])
            sampler.load_state_dict(state["sampler"])
            results_before = state.get("results_before")
            run["mlflow_run_id"] = state.get("mlflow_run_id") or run.get("mlflow_run_id")
            rank0_print(f"[rlora] resumed from {resume_dir} at step {global_step}/{total_steps}")

    tracker = None
    if is_rank0() and run.get("mlflow_run_id"):
        from ..tracking.mlflow_tracker import Tracker

        tracker = Tracker(run["tracking_uri"], run["mlflow_run_id"])
        if global_step == 0:
            tracker.log_metrics({f"data/truncated/{k}": v for k, v in truncated.items()}, step=0)

    if cfg.eval.before_training and results_before is None and dev:
        with gathered(engine.module, cfg.deepspeed.stage):
            results_before = _evaluate(engine.module, tokenizer, cfg, dev, names, rank, world)
        if tracker:
            tracker.log_metrics({f"eval_before/{k}/accuracy": v["accuracy"] for k, v in results_before.items()}, 0)
    rank0_print(f"[rlora] rank {rank}/{world}: ready in {time.time() - t_start:.1f}s "
                f"({len(names)} tasks, {sum(map(len, tokenized.values()))} train rows, {total_steps} steps, "
                f"ZeRO-{cfg.deepspeed.stage})")

    # ---- train
    T = len(names)
    probe = None
    if cfg.diagnostics.enabled:
        from ..tracking.diagnostics import make_probe

        probe = make_probe(tokenized, names, pad_id, cfg.diagnostics.probe_batch_size)
    engine.train()
    window_tokens, window_t0, first_step_s = 0, time.time(), None
    train_tokens, train_t0 = 0, None
    side_s = 0.0  # seconds of diagnostics, mid-run eval and checkpoints: not part of training throughput
    t_loop = time.time()
    loss_hist: list[float] = []

    def report(write=None) -> None:
        """Checkpoint on every rank and report it to Ray; ``write(dir)`` adds the final adapter/results."""
        with tempfile.TemporaryDirectory(prefix="rlora-ckpt-") as d:
            ckpt.save(engine, Path(d), rank, {
                "global_step": global_step, "sampler": sampler.state_dict(), "run_name": run["run_name"],
                "mlflow_run_id": run.get("mlflow_run_id"), "results_before": results_before,
                "total_steps": total_steps})
            if write is not None:
                write(Path(d))
            ray.train.report({"global_step": global_step, "loss": loss_hist[-1] if loss_hist else float("nan")},
                             checkpoint=ray.train.Checkpoint.from_directory(d))

    while global_step < total_steps:
        sums = torch.zeros(T)
        counts = torch.zeros(T)
        for _ in range(ga):
            batch = next_micro_batch(sampler, tokenized, names, pad_id, engine.device)
            loss, s, c = forward_loss(engine, batch, T)
            engine.backward(loss)
            engine.step()
            sums += s.float().cpu()
            counts += c.float().cpu()
            window_tokens += batch["tokens"]
            train_tokens += batch["tokens"] if train_t0 is not None else 0
        global_step += 1
        if first_step_s is None:
            first_step_s = time.time() - t_start
            train_t0 = time.time()  # steady-state throughput excludes the first step
        stats = all_reduce_sum(torch.cat([sums, counts]))
        task_loss = (stats[:T] / stats[T:].clamp(min=1)).tolist()
        task_loss = [x if c > 0 else float("nan") for x, c in zip(task_loss, stats[T:].tolist())]
        conflict = None
        t_side = time.time()  # diagnostics, mid-run eval and checkpoints are timed apart from training
        if probe is not None and (global_step % cfg.diagnostics.every_n_steps == 0 or global_step == total_steps):
            conflict = _diagnostics(engine, cfg, probe, names, sampler, tracker, global_step)
        side_s += time.time() - t_side
        sampler.update(task_loss, conflict=conflict)
        step_loss = float(stats[:T].sum() / stats[T:].sum().clamp(min=1))
        loss_hist.append(step_loss)

        if global_step % t.logging_steps == 0 or global_step == total_steps:
            elapsed = time.time() - window_t0
            tps = all_reduce_sum(torch.tensor([float(window_tokens)])).item() / max(elapsed, 1e-9)
            window_tokens, window_t0 = 0, time.time()
            spent = time.time() - t_start
            done = global_step - (resumed_from or 0)
            eta = (total_steps - global_step) * (time.time() - t_loop) / max(done, 1)
            lr = engine.get_lr()[0]
            rank0_print(f"[rlora] step {global_step:>5d}/{total_steps} {100 * global_step / total_steps:5.1f}% | "
                        f"loss {step_loss:.4f} | {tps:,.0f} tok/s | lr {lr:.2e} | elapsed {_format_eta(spent)} | "
                        f"ETA {_format_eta(eta)}")
            if tracker:
                m = {"train/loss": step_loss, "train/learning_rate": lr, "train/tokens_per_s": tps}
                m.update({f"train/loss/{n}": v for n, v in zip(names, task_loss)})
                m.update({f"sampler/p/{n}": float(p) for n, p in zip(names, sampler.probabilities)})
                tracker.log_metrics(m, global_step)

        t_side = time.time()
        if cfg.eval.every_n_steps and global_step % cfg.eval.every_n_steps == 0 and global_step < total_steps:
            with gathered(engine.module, cfg.deepspeed.stage):
                res = _evaluate(engine.module, tokenizer, cfg, dev, names, rank, world)
            if tracker:
                tracker.log_metrics({f"eval/{k}/accuracy": v["accuracy"] for k, v in res.items()}, global_step)

        if t.fail_at_step is not None and global_step == t.fail_at_step and rank == world - 1:
            marker = Path(run["storage_dir"]) / f".fault_injected_step{global_step}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(os.getpid()))
                print(f"[rlora] fault injection: worker rank {rank} exits at step {global_step}", flush=True)
                os._exit(1)

        if global_step % t.save_steps == 0 and global_step < total_steps:
            report()
        side_s += time.time() - t_side

    train_elapsed = (time.time() - train_t0 - side_s) if train_t0 else None
    # ---- evaluate, export, final checkpoint
    results_after = {}
    if dev:
        with gathered(engine.module, cfg.deepspeed.stage):
            results_after = _evaluate(engine.module, tokenizer, cfg, dev, names, rank, world)
    with gathered(engine.module, cfg.deepspeed.stage):
        from ..adapter_io import adapter_state_dict

        adapter_state = {k: v.detach().cpu().clone() for k, v in adapter_state_dict(engine.module).items()}

    summary = {"run_name": run["run_name"], "global_step": global_step, "total_steps": total_steps,
               "results_before": results_before, "results_after": results_after, "truncated": truncated,
               "time_to_first_step_s": first_step_s,
               "train_tokens_per_s": (all_reduce_sum(torch.tensor([float(train_tokens)])).item()
                                      / max(train_elapsed, 1e-9)) if train_elapsed else None, "train_loss_last": loss_hist[-1] if loss_hist else None,
               "mlflow_run_id": run.get("mlflow_run_id"), "resumed_from_step": resumed_from,
               "sampler_state": sampler.state_dict(), "worker_nodes": gather_objects(ray.get_runtime_context().get_node_id())}

    def write(d: Path) -> None:
        if rank == 0:
            from ..adapter_io import save_adapter

            save_adapter(engine.module, d / "adapter", state=adapter_state,
                         extra={"run_name": run["run_name"], "global_step": global_step})
            (d / "results.json").write_text(json.dumps(summary, indent=1))

    if tracker:
        tracker.log_metrics({f"eval/{k}/accuracy": v["accuracy"] for k, v in results_after.items()}, global_step)
    report(write)
