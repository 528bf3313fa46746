"""The one training loop. The Ray worker (:mod:`rlora.train.worker`), the local run
(:mod:`rlora.train.local`), the benchmarks and the tests all train through :class:`Trainer`::

    Trainer(cfg, runtime, run).fit()
        setup_data         tasks, tokenised rows, dev rows, this rank's sampler
        build_model        base model (partitioned at load under ZeRO-3), adapters, DeepSpeed engine
        resume             the newest checkpoint of this run, if any
        start_tracking     the MLflow run (rank 0)
        evaluate_before    zero-shot dev accuracy (skipped when resumed)
        until the last step:
            train_step     gradient accumulation over micro-batches, per-task losses all-reduced
            diagnose       head/task diagnostics; the task-conflict signal for the sampler
            log            progress line and metrics
            evaluate       mid-run dev accuracy every ``eval.every_n_steps``
            checkpoint     every ``trainer.save_steps``
        finish             final evaluation, the adapter, results, the final checkpoint

Every rank runs every phase; collectives (loss all-reduce, ZeRO-3 gathers, eval gathers) run on all
ranks; side effects (printing, MLflow) are rank 0's (:mod:`rlora.distributed`). Time spent in
diagnostics, mid-run evaluation and checkpoints is kept out of the training throughput.

Momentum note: AdamW keeps moving a task's private parameters (MTL-LoRA's Λ_t and w_t) by their
momentum in steps where that task is absent from the batch. With ``mixed`` batches every task is in
nearly every optimizer step, so this is rare; we keep plain AdamW semantics.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..config import RunConfig
from ..distributed import all_reduce_sum, gather_objects
from ..tracking.run_record import eval_metrics, write_training_record
from . import checkpoint as ckpt
from . import stopping
from .fault_injection import maybe_exit
from .runtime import Runtime


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def gathered(model, stage: int) -> Iterator[None]:
    """Under ZeRO-3, gather the adapter parameters on every rank (a collective) for reading."""
    if stage != 3:
        yield
        return
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


class _Clock:
    """Wall time of the run, split into training and side work (diagnostics, mid-run eval, checkpoints)."""

    def __init__(self) -> None:
        self.start = time.time()
        self.loop_start: Optional[float] = None
        self.first_step_s: Optional[float] = None
        self.train_t0: Optional[float] = None  # steady state: after the first step
        self.train_tokens = 0
        self.side_s = 0.0
        self.window_t0, self.window_tokens, self.window_side0 = time.time(), 0, 0.0

    def start_loop(self) -> None:
        """The training loop starts: the first progress window starts here, not at setup."""
        self.loop_start = self.window_t0 = time.time()
        self.window_tokens, self.window_side0 = 0, self.side_s

    @contextlib.contextmanager
    def side(self) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.side_s += time.time() - t0

    def step_done(self, tokens: int) -> None:
        self.window_tokens += tokens
        if self.train_t0 is not None:
            self.train_tokens += tokens
        else:
            self.first_step_s = time.time() - self.start
            self.train_t0 = time.time()

    def window(self) -> tuple[int, float]:
        """Tokens and training seconds (side work left out) since the last call."""
        now = time.time()
        out = (self.window_tokens, now - self.window_t0 - (self.side_s - self.window_side0))
        self.window_t0, self.window_tokens, self.window_side0 = now, 0, self.side_s
        return out

    def train_seconds(self) -> Optional[float]:
        return None if self.train_t0 is None else time.time() - self.train_t0 - self.side_s


class Trainer:
    """One rank's training run; ``run`` holds the driver's decisions (run name, storage folder,
    MLflow run id, tracking URI, explicit resume path, start time)."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, run: dict[str, Any], *, model=None, tokenizer=None,
                 progress: bool = True):
        self.cfg, self.rt, self.run = cfg, runtime, run
        self.rank, self.world = runtime.rank, runtime.world_size
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.step = 0
        self.resumed_from: Optional[int] = None
        self._wall_s_before = 0.0  # wall seconds of earlier invocations of this run (to the checkpoint resumed)
        self.results_before: Optional[dict] = None
        self.results_after: dict = {}
        self.eval_history: list[tuple[int, dict]] = []
        self.loss_hist: list[float] = []
        self.task_hist: list[list[float]] = []
        self.tracker = None
        self.p_history: list[dict] = []  # {"step", "probabilities"} of every logged step (the task-weights plot)
        self._pending_plots = None  # this step's diagnostics, plotted after log() (plot_diagnostics)
        self.align_loss: Optional[float] = None  # Align-LoRA's alignment term of the last step
        self.clock = _Clock()
        self.data_order = ""  # chained sha256 of the (task, example) slots of rank 0's micro-batches, in order

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.setup_data()
        self.build_model()
        self.resume()
        self.start_tracking()
        self.evaluate_before()
        self._say(f"[rlora] ready in {time.time() - self.clock.start:.1f}s: {len(self.data.names)} tasks, "
                  f"{self.data.rows} train rows, {self.total_steps} steps, {self.world} process(es) x ZeRO-"
                  f"{self.cfg.deepspeed.stage}, {self.trainable:,} trainable parameters")
        self.engine.train()
        self.clock.start_loop()
        while self.step < self.total_steps:
            if stopping.received() is not None:  # SIGTERM/SIGINT of the command (a compare cell's thread)
                raise KeyboardInterrupt(f"stopped at step {self.step}")
            task_loss, step_loss = self.train_step()
            conflict = self.diagnose()
            self.data.sampler.update(task_loss, conflict=conflict)
            self.log(task_loss, step_loss)
            self.plot_diagnostics()
            self.evaluate_mid_run()
            maybe_exit(self.cfg.trainer.fail_at_step, self.step, self.rank, self.world, self.run.get("storage_dir"))
            if self.step % self.cfg.trainer.save_steps == 0 and self.step < self.total_steps:
                with self.clock.side():
                    self.checkpoint()
        return self.finish()

    # ---- phases ---------------------------------------------------------------------------------
    def setup_data(self) -> None:
        from ..models import load_tokenizer
        from .data_setup import load_train_data

        cfg = self.cfg
        torch.set_num_threads(max(1, int(cfg.ray.resources_per_worker.get("CPU", 1))))
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        self.data = load_train_data(cfg, self.tokenizer, self.rank, self.world)
        self.total_steps = self.data.total_steps
        self._say(self.data.cache_note)

    def build_model(self) -> None:
        from ..inject import count_parameters, inject
        from .engine import build_engine, ds_config, init_comm, load_model

        cfg, t = self.cfg, self.cfg.trainer
        init_comm()
        model = self.model if self.model is not None else load_model(cfg, ds_config(cfg, self.world))
        torch.manual_seed(t.seed)  # identical adapter init on every rank, whatever the path
        inject(model, cfg.adapter)
        if t.gradient_checkpointing:
            from ..context import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        self.trainable = count_parameters(model)[0]
        self.engine, _, _ = build_engine(model, cfg, self.world, self.total_steps)
        torch.manual_seed(t.seed * 1000 + self.rank)  # per-rank dropout streams

    def resume(self) -> None:
        """Candidates: the checkpoint the runtime hands over (after a worker-group restart; it can lag
        behind when the group failed right after a report), the newest complete checkpoint of this run
        in its storage folder (none is handed over after a driver restart), else the driver's explicit
        choice. Every rank sees the same candidates and takes the one with the highest step."""
        run, t = self.run, self.cfg.trainer
        with contextlib.ExitStack() as stack:
            cands = []
            handed = stack.enter_context(self.rt.restored_checkpoint())
            if handed is not None:
                cands.append(Path(handed))
            storage = Path(run["storage_dir"]) if run.get("storage_dir") else None
            local = ckpt.latest_in(storage, self.world) if storage is not None and storage.is_dir() else None
            # with "never" or an explicit path, only checkpoints this invocation wrote (after a worker restart)
            only_new = t.resume_from_checkpoint not in (None, "auto")
            if local and not (only_new and local.stat().st_mtime < run["started_at"]):
                cands.append(local)
            if not cands and run.get("resume_from"):
                cands.append(Path(run["resume_from"]))
            if not cands:
                return
            best = max(cands, key=lambda p: ckpt.read_state(p)["global_step"])
            state = ckpt.load(self.engine, best, self.rank)
        self.step = self.resumed_from = int(state["global_step"])
        self.data.sampler.load_state_dict(state["sampler"])
        self.results_before = state.get("results_before")
        self.data_order = state.get("data_order", "")
        self._plan_state = state.get("probe_plan")  # the diagnostics rotation goes on where it stopped
        self._train_s_before = float(state.get("train_seconds") or 0.0)
        # a worker-group restart within this invocation resumes a checkpoint stamped with its start: the
        # invocation's own clock already covers the failed group, so only earlier invocations carry over
        same = state.get("started_at") == run["started_at"]
        self._wall_s_before = float(state.get("wall_before" if same else "wall_seconds") or 0.0)
        run["mlflow_run_id"] = state.get("mlflow_run_id") or run.get("mlflow_run_id")
        self._say(f"[rlora] resumed from {best} at step {self.step}/{self.total_steps}")

    def start_tracking(self) -> None:
        if self.rank != 0 or not self.run.get("mlflow_run_id"):
            return
        from ..tracking.mlflow_tracker import Tracker

        self.tracker = Tracker(self.run["tracking_uri"], self.run["mlflow_run_id"])
        if self.step == 0:  # fixed numbers: params, not charts
            self.tracker.log_params({f"data.truncated_rows.{k}": v for k, v in self.data.truncated.items()})
        else:  # the task weights logged before the restart: the task-weights plot keeps its history
            hists = [dict(self.tracker.metric_history(f"sampler/p/{n}")) for n in self.data.names]
            steps = sorted(set.intersection(*(set(h) for h in hists))) if hists else []
            self.p_history = [{"step": st, "probabilities": [h[st] for h in hists]} for st in steps if st <= self.step]
        if self.cfg.mlflow.log_system_metrics:
            self.tracker.start_system_metrics()

    def evaluate_before(self) -> None:
        """Zero-shot dev results: from the fingerprint cache (:mod:`rlora.train.zero_shot`) when this base
        model, these dev rows and settings were evaluated before, else evaluated (and cached)."""
        from . import zero_shot

        if not self.cfg.eval.before_training or self.results_before is not None or not self.data.dev:
            return
        key = zero_shot.fingerprint(self.cfg, self.data.dev) if zero_shot.starts_at_base(self.cfg) else None
        cached = gather_objects(zero_shot.load(key) if key and self.rank == 0 else None)[0]
        if cached is not None:
            self.results_before = cached
            self._say(f"[rlora] zero-shot results of the base model: cached ({zero_shot.cache_file(key)})")
        else:
            self.results_before = self.evaluate()
            if key and self.rank == 0:
                zero_shot.store(key, self.results_before)
        self._track(eval_metrics(self.results_before), 0)

    def train_step(self) -> tuple[list[float], float]:
        """One optimizer step over ``G`` micro-batches on every rank.

        The gradient is the mean over the step's answer tokens (all micro-batches, all ranks): each
        micro-batch loss is its token-loss sum divided by ``N / (G * W)``, with ``N`` the step's
        all-reduced answer-token count, since DeepSpeed divides each loss by ``G`` and averages the
        gradients over the ``W`` ranks. So 2 micro-batches of 2 rows equal 1 of 4, and the split over
        ranks does not change the update. Returns the per-task mean answer-token loss over all ranks
        (NaN for an absent task) and the step's mean loss."""
        from .batches import answer_tokens, forward_loss, next_micro_batch

        d, T, ga = self.data, len(self.data.names), self.cfg.trainer.gradient_accumulation_steps
        batches = [next_micro_batch(d.sampler, d.tokenized, d.names, d.pad_id, self.engine.device) for _ in range(ga)]
        for b in batches:
            self.data_order = hashlib.sha256((self.data_order + repr(b["slots"])).encode()).hexdigest()
        n_tokens = all_reduce_sum(torch.tensor([float(sum(map(answer_tokens, batches)))])).item()
        normalizer = max(n_tokens, 1.0) / (ga * self.world)
        sums, counts = torch.zeros(T), torch.zeros(T)
        for batch in batches:
            loss, s, c = forward_loss(self.engine, batch, T, normalizer=normalizer, autocast=self.cfg.trainer.bf16)
            self.engine.backward(loss)
            self.engine.step()
            sums += s.float().cpu()
            counts += c.float().cpu()
        self.step += 1
        self.clock.step_done(sum(b["tokens"] for b in batches))
        stats = all_reduce_sum(torch.cat([sums, counts]))
        aligned = [b["align_loss"] for b in batches if "align_loss" in b]  # Align-LoRA: on every rank or none
        if aligned:  # the unweighted alignment term, mean over the step's micro-batches and ranks
            a = all_reduce_sum(torch.tensor([float(sum(aligned)), float(len(aligned))]))
            self.align_loss = float(a[0] / a[1])
        task_loss = [float(x / c) if c > 0 else float("nan") for x, c in zip(stats[:T].tolist(), stats[T:].tolist())]
        step_loss = float(stats[:T].sum() / stats[T:].sum().clamp(min=1))
        self.loss_hist.append(step_loss)
        self.task_hist.append(task_loss)
        return task_loss, step_loss

    def diagnose(self) -> Optional[Any]:
        """Head diagnostics every ``diagnostics.every_n_steps`` (and at the last step) on every rank
        (identical inputs give identical results); rank 0 logs metrics and plots. The probe covers the
        tasks that ``diagnostics.max_time_fraction`` of the training time allows, rotating
        (:mod:`rlora.tracking.probe_budget`; rank 0 picks how many). Returns the latest [T, T]
        task-conflict matrix for the sampler (NaN where a pair was not probed yet; ``None`` in other steps)."""
        dc = self.cfg.diagnostics
        if not dc.enabled or not (self.step % dc.every_n_steps == 0 or self.step == self.total_steps):
            return None
        from ..tracking.diagnostics import make_probe, run_diagnostics
        from ..tracking.probe_budget import ProbePlan

        t0 = time.time()
        with self.clock.side():
            if not hasattr(self, "_probe"):
                self._probe = make_probe(self.data.tokenized, self.data.names, self.data.pad_id, dc.probe_batch_size)
                saved = getattr(self, "_plan_state", None)  # the rotation, timings and matrix before a resume
                if saved is not None and int(saved.get("num_tasks", -1)) == len(self.data.names):
                    self._plan = ProbePlan.from_state(saved)
                else:
                    self._plan = ProbePlan(len(self.data.names), seed=self.cfg.trainer.seed)
            steps = max(1, self.step - (self.resumed_from or 0))
            train_s, step_s = self._train_s(), self._train_s(total=False) / steps
            t = self.cfg.trainer
            k = gather_objects(self._plan.choose(dc.max_time_fraction, train_s, step_s, dc.probe_batch_size,
                                                 t.per_device_train_batch_size * t.gradient_accumulation_steps))[0]
            subset = [self.data.names[i] for i in self._plan.next_subset(k)]
            probe = {n: self._probe[n] for n in subset if n in self._probe}
            stage3 = self.cfg.deepspeed.stage == 3
            with gathered(self.engine.module, self.cfg.deepspeed.stage):
                # under ZeRO-3 the probe runs forward-only (router usage): per-task autograd.grad through
                # partitioned parameters is not supported, so the interference matrix is left out there
                diag = run_diagnostics(self.engine.module, probe, self.data.names, interference=not stage3)
            self.engine.module.train()
            self._track(diag.metrics(), self.step)
            self._pending_plots = diag
        self._diag_s = time.time() - t0
        return None if diag.conflict is None else self._plan.merge(diag.conflict)

    def _wall_s(self) -> float:
        """Wall seconds of the run up to now: this invocation's (from its start, setup and side work included)
        plus those of earlier invocations, each counted to the checkpoint the next one resumed from."""
        return time.time() - self.run["started_at"] + self._wall_s_before

    def _train_s(self, total: bool = True) -> float:
        """Training seconds so far: the loop's wall time less side work, of this invocation
        (``total=False``) or plus those of the invocations before a resume (the probe budget's S,
        which the restored plan's spent seconds D are measured against)."""
        now = time.time() - (self.clock.loop_start or self.clock.start) - self.clock.side_s
        return now + (getattr(self, "_train_s_before", 0.0) if total else 0.0)

    def plot_diagnostics(self) -> None:
        """Rank 0 writes the plots of this step's diagnostics pass, after :meth:`log`, so the
        task-weights plot has one point per logged step up to and including this one. The last pass
        of a run plots the stored merged conflict matrix (every pair's latest cosine,
        :meth:`~rlora.tracking.probe_budget.ProbePlan.merge`) rather than its own probe, which a
        budgeted many-task run may have left empty: every run ends with its interference figure."""
        diag, self._pending_plots = self._pending_plots, None
        if diag is None:
            return
        t0, fraction, figures, figures_s = time.time(), self.cfg.diagnostics.max_time_fraction, True, None
        if self.tracker and self.cfg.mlflow.log_artifacts:
            import dataclasses

            from ..tracking.plots import save_diagnostic_plots

            last = self.step == self.total_steps
            figures = self._plan.draw_figures(fraction, self._train_s(), self._diag_s, last)
            shown = dataclasses.replace(diag, interference=self._plan.latest.copy()) \
                if last and self._plan.latest is not None else diag
            with self.clock.side(), tempfile.TemporaryDirectory(prefix="rlora-diag-") as tmp:
                t1 = time.time()
                save_diagnostic_plots(shown, tmp, history=self.p_history, figures=figures)
                figures_s = time.time() - t1 if figures else None
                self.tracker.log_artifacts(tmp, f"diagnostics/step_{self.step:06d}")
        pass_s = self._diag_s + time.time() - t0
        self._plan.record(pass_s, diag.probe_seconds, len(diag.probed), figures_s)
        c = diag.interference
        pairs = 0 if c is None else int(np.isfinite(c[np.triu_indices(len(c), 1)]).sum())
        self._say(self._plan.budget_line(self.step, len(diag.probed), pairs, diag.probe_seconds, pass_s, fraction,
                                         self._train_s(), figures))

    def log(self, task_loss: list[float], step_loss: float) -> None:
        t = self.cfg.trainer
        if not (self.step % t.logging_steps == 0 or self.step == self.total_steps):
            return
        tokens, seconds = self.clock.window()
        tps = all_reduce_sum(torch.tensor([float(tokens)])).item() / max(seconds, 1e-9)
        elapsed = time.time() - self.clock.start
        done = self.step - (self.resumed_from or 0)
        eta = (self.total_steps - self.step) * (time.time() - self.clock.loop_start) / max(done, 1)
        lr = self.engine.get_lr()[0]
        self._say(f"[rlora] step {self.step:>5d}/{self.total_steps} {100 * self.step / self.total_steps:5.1f}% | "
                  f"loss {step_loss:.4f} | {tps:,.0f} tok/s | lr {lr:.2e} | elapsed {format_duration(elapsed)} | "
                  f"ETA {format_duration(eta)}")
        names, sampler = self.data.names, self.data.sampler
        m = {"train/loss": step_loss, "train/learning_rate": lr, "train/tokens_per_s": tps}
        if self.align_loss is not None:
            m["train/align_loss"] = self.align_loss
        m.update({f"train/loss/{n}": v for n, v in zip(names, task_loss)})
        m.update({f"sampler/p/{n}": float(p) for n, p in zip(names, sampler.probabilities)})
        self._track(m, self.step)
        self.p_history.append({"step": self.step, "probabilities": [float(p) for p in sampler.probabilities]})

    def evaluate_mid_run(self) -> None:
        every = self.cfg.eval.every_n_steps
        if not every or self.step % every or self.step >= self.total_steps or not self.data.dev:
            return
        with self.clock.side():
            res = self.evaluate()
        self.eval_history.append((self.step, res))
        self._track(eval_metrics(res), self.step)

    def checkpoint(self, write=None) -> None:
        """Every rank writes its shards + RNG (rank 0 the trainer state) and reports the checkpoint;
        ``write(dir)`` adds the final adapter and results."""
        if not self.rt.saves_checkpoints:
            return
        with tempfile.TemporaryDirectory(prefix="rlora-ckpt-") as d:
            ckpt.save(self.engine, Path(d), self.rank, {
                "global_step": self.step, "sampler": self.data.sampler.state_dict(),
                "run_name": self.run["run_name"], "mlflow_run_id": self.run.get("mlflow_run_id"),
                "results_before": self.results_before, "total_steps": self.total_steps,
                "data_order": self.data_order,
                "probe_plan": self._plan.state_dict() if hasattr(self, "_plan") else None,
                "train_seconds": self._train_s(), "wall_seconds": self._wall_s(),
                "started_at": self.run["started_at"], "wall_before": self._wall_s_before})
            if write is not None:
                write(Path(d))
            self.rt.report({"global_step": self.step, "loss": self.loss_hist[-1] if self.loss_hist else float("nan")},
                           Path(d))
        self._say(f"[rlora] checkpoint: step {self.step}")

    def finish(self) -> dict[str, Any]:
        from ..adapter_io import adapter_state_dict, save_adapter

        train_s = self.clock.train_seconds()
        if self.data.dev:
            self.results_after = self.evaluate()
        with gathered(self.engine.module, self.cfg.deepspeed.stage):
            state = {k: v.detach().cpu().clone() for k, v in adapter_state_dict(self.engine.module).items()}
        self.adapter_state = state
        train_tokens = all_reduce_sum(torch.tensor([float(self.clock.train_tokens)])).item()
        self.summary = {
            "run_name": self.run["run_name"], "global_step": self.step, "total_steps": self.total_steps,
            "results_before": self.results_before, "results_after": self.results_after,
            "truncated": self.data.truncated, "time_to_first_step_s": self.clock.first_step_s,
            "train_tokens_per_s": train_tokens / max(train_s, 1e-9) if train_s else None,
            "train_seconds": train_s, "wall_seconds_before": self._wall_s_before,
            "train_loss": self.loss_hist,
            "train_loss_last": self.loss_hist[-1] if self.loss_hist else None,
            "mlflow_run_id": self.run.get("mlflow_run_id"), "resumed_from_step": self.resumed_from,
            "trainable_params": self.trainable, "sampler_state": self.data.sampler.state_dict(),
            "data_order": gather_objects(self.data_order)[0],
            "worker_nodes": gather_objects(self.rt.node_id())}
        self._track(eval_metrics(self.results_after), self.step)

        def write(d: Path) -> None:
            if self.rank == 0:
                save_adapter(self.engine.module, d / "adapter", state=state,
                             extra={"run_name": self.run["run_name"], "global_step": self.step})
                write_training_record(d / "adapter", self.cfg.model_dump(mode="json"), self.run.get("mlflow_run_id"),
                                      self.run.get("tracking_uri"), self.step)
                (d / "results.json").write_text(json.dumps(self.summary, indent=1))

        self.checkpoint(write)
        if self.tracker:
            self.tracker.stop_system_metrics()
        return self.summary

    # ---- helpers --------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Per-task dev metrics, rows sharded over ranks and merged (a collective).

        Under ZeRO-3 every forward gathers the partitioned base weights (collectives every rank must
        match), and a shard's number of forwards depends on its rows: there every rank scores all rows,
        running the same forwards, and the ranks' equal results are not merged."""
        from ..data import evaluate_tasks, merge_metrics, prompt_templates

        cfg, model = self.cfg, self.engine.module
        whole = cfg.deepspeed.stage == 3 and self.world > 1
        rank, world = (0, 1) if whole else (self.rank, self.world)
        with gathered(model, cfg.deepspeed.stage):
            model.eval()
            with torch.no_grad():
                part = evaluate_tasks(model, self.tokenizer, self.data.dev, self.data.names,
                                      batch_size=cfg.trainer.per_device_eval_batch_size,
                                      length_normalized=cfg.eval.length_normalized, max_length=cfg.data.max_length,
                                      use_chat_template=cfg.data.use_chat_template,
                                      templates=prompt_templates(cfg.data),
                                      max_examples_per_task=cfg.eval.max_examples_per_task, rank=rank,
                                      world_size=world, progress=False)
            model.train()
        parts = [part] if whole else gather_objects(part)
        return {t: merge_metrics([p[t] for p in parts]) for t in self.data.dev}

    def _say(self, line: str) -> None:
        if self.progress and self.rank == 0:
            self.rt.say(line)

    def _track(self, metrics: dict, step: int) -> None:
        if self.tracker:
            self.tracker.log_metrics(metrics, step)
