"""Per-task dev accuracy of lora, hydra, rlora and mtl at equal trainable-parameter budgets, then the
task samplers with the best method; Markdown table + bar chart + JSON in benchmarks/results/.

Protocol (one process, :func:`rlora.train.local.train_local`, same base model, steps, seed, batches):

1. **Zero-shot**: the base model before the first step (every method starts exactly at the base
   model: B = 0 for lora/hydra/mtl, the zero-start offset for rlora).
2. **Methods** with the ``proportional`` sampler. Budget: the shared A + B parameters are equal. For a
   module d_in -> d_out, LoRA of rank R has R (d_in + d_out); a multi-head adapter with rank r and N
   heads has r (d_in + N d_out) (= LoRA with R = (N + 1) r / 2 for square modules). Over all adapted
   modules ``R = round(r * sum(d_in + N d_out) / sum(d_in + d_out))``; both budgets are printed with
   their difference (within 2%). On top of A + B: hydra/rlora have a router (N d_in per module),
   mtl has Λ_t and w_t (T r^2 + T N per module); totals are printed too.
3. **Samplers** (``proportional``, ``temperature``, ``uniform``, ``dynamic``) with the method of the
   best mean accuracy. A static sampler whose distribution equals proportional's exactly (balanced
   data) would replay the proportional run draw for draw, so that run is reused and marked.

Full-grid settings (46 min measured on 2 idle CPU cores, mtl_cpu6: 5 trainings, 6 evaluations): SmolLM2-135M
(``smollm2-135m``), adapters on q_proj, v_proj, o_proj, down_proj; r = 8, N = 3 heads, alpha = 2 x
rank, dropout 0.05; plain prompt layout (no chat template: ~37 instead of ~64 tokens a row),
max_length 128; 200 steps of 8 rows (1,600 rows, ~27% of an epoch of mtl_cpu6), AdamW lr 1e-3,
5% warmup then linear decay, max_grad_norm 1, seed 42; 100 dev rows per task; torch threads 2.
``--quick``: 4 steps and 4 dev rows per task (a smoke run of the whole pipeline, minutes; its
accuracies mean nothing) -- it also prints the full grid's estimated time at the measured speed.

    python benchmarks/quality.py [--data DIR] [--quick] [--json] [--threads N] [--steps N] [--eval-examples N]
                                 [--seed N] [--out DIR]

``--data`` is any directory in the JSONL interchange format (one folder per task), with any number of
tasks; the default ``../shared/data/mtl_cpu6`` is resolved from the repository root.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, figure, parser  # noqa: E402

DEFAULT_DATA = REPO / ".." / "shared" / "data" / "mtl_cpu6"
RESULTS = REPO / "benchmarks" / "results"
METHODS = ["lora", "hydra", "rlora", "mtl"]
SAMPLERS = ["proportional", "temperature", "uniform", "dynamic"]
LABELS = {"lora": "LoRA", "hydra": "HydraLoRA", "rlora": "R-LoRA", "mtl": "MTL-LoRA"}


@dataclasses.dataclass
class Settings:
    model: str = "smollm2-135m"
    target_modules: tuple = ("q_proj", "v_proj", "o_proj", "down_proj")
    r: int = 8
    heads: int = 3
    alpha_per_rank: float = 2.0
    dropout: float = 0.05
    max_length: int = 128
    use_chat_template: bool = False
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_examples: int = 100
    eval_batch_size: int = 16
    threads: int = 2
    logging_steps: int = 25
    dynamic_interval: int = 10
    dynamic_window: int = 10
    probe_rows: int = 8


# a smoke run; the dynamic sampler re-weights every 2 steps so that its path runs too
QUICK = dict(steps=4, eval_examples=4, logging_steps=2, dynamic_interval=2, dynamic_window=1)


# ----------------------------------------------------------------------------------------------
# budgets
# ----------------------------------------------------------------------------------------------
def module_shapes(model, targets) -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear module the adapters will wrap."""
    from torch import nn

    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def lora_rank_for(shapes, r: int, heads: int) -> int:
    """LoRA rank whose A + B budget matches rank r with N heads: R = r * sum(d_in + N d_out) / sum(d_in + d_out)."""
    return max(1, round(r * sum(i + heads * o for i, o in shapes) / sum(i + o for i, o in shapes)))


def budget(shapes, method: str, rank: int, heads: int, tasks: int) -> dict[str, int]:
    """Trainable parameters: shared A + B, and the method's extra (router, or Λ and w)."""
    n = 1 if method == "lora" else heads
    ab = sum(rank * i + n * rank * o for i, o in shapes)
    if method in ("hydra", "rlora"):
        extra = sum(heads * i for i, _ in shapes)
    elif method == "mtl":
        extra = len(shapes) * (tasks * rank * rank + tasks * heads)
    else:
        extra = 0
    return {"ab": ab, "extra": extra, "total": ab + extra}


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------
def run_config(s: Settings, data: Path, method: str, rank: int, strategy: str):
    from rlora.config import RunConfig

    return RunConfig.model_validate({
        "model": {"name_or_path": s.model},
        "adapter": {"method": method, "r": rank, "alpha": s.alpha_per_rank * rank, "dropout": s.dropout,
                    "num_heads": s.heads, "target_modules": list(s.target_modules)},
        "data": {"path": str(data), "max_length": s.max_length, "use_chat_template": s.use_chat_template},
        "sampler": {"strategy": strategy, "dynamic_interval": s.dynamic_interval,
                    "dynamic_window": s.dynamic_window},
        "trainer": {"max_steps": s.steps, "per_device_train_batch_size": s.batch_size,
                    "learning_rate": s.learning_rate, "warmup_ratio": s.warmup_ratio, "lr_scheduler_type": "linear",
                    "max_grad_norm": s.max_grad_norm, "seed": s.seed, "logging_steps": s.logging_steps,
                    "per_device_eval_batch_size": s.eval_batch_size},
        "eval": {"max_examples_per_task": s.eval_examples, "before_training": False},
        "mlflow": {"enabled": False},
    })


def summarize(results: dict) -> dict:
    acc = {t: r["accuracy"] for t, r in results.items()}
    worst = min(acc, key=acc.get)
    return {"accuracy": acc, "n": {t: r["n"] for t, r in results.items()}, "mean": float(np.mean(list(acc.values()))),
            "worst": acc[worst], "worst_task": worst}


def diagnose(model, probe: dict, tasks: list[str]) -> dict:
    """The trained adapters' head and task diagnostics (:func:`rlora.tracking.diagnostics.run_diagnostics`
    on a probe of training rows): did the heads collapse, how do the routers and mixings spread, do
    the tasks' gradients conflict at the end of training?"""
    from rlora.tracking.diagnostics import run_diagnostics

    d = run_diagnostics(model, probe, tasks)
    m = d.metrics()
    out = {k: m.get(f"diag/{k}/{stat}") for k, stat in (("head_cos_BA", "mean"), ("head_cos_B", "mean"),
                                                         ("eff_rank", "mean"), ("head_norm", "mean"),
                                                         ("router_entropy", "mean"), ("lambda_dev", "mean"))}
    out["interference_mean"] = m.get("diag/interference/mean")
    out["interference_min"] = m.get("diag/interference/min")
    out["interference"] = None if d.interference is None else d.interference.tolist()
    out["router_usage"] = None if d.router is None else np.asarray(d.router["usage"]).tolist()
    out["mtl_mixing"] = None if d.mtl is None else np.asarray(d.mtl["mixing"]).tolist()
    out["seconds"] = d.seconds
    return out


def train_one(s: Settings, data: Path, method: str, rank: int, strategy: str, tokenizer, eval_before: bool,
              probe: Optional[dict] = None) -> dict:
    from rlora.models import load_base_model
    from rlora.train.local import train_local

    t0, c0 = time.time(), time.process_time()
    cfg = run_config(s, data, method, rank, strategy)
    print(f"\n== {LABELS[method]} (rank {rank}), sampler {strategy}", flush=True)
    out = train_local(cfg, model=load_base_model(s.model), tokenizer=tokenizer, progress=True, eval_before=eval_before)
    wall = time.time() - t0
    res = {"method": method, "sampler": strategy, "rank": rank, "trainable_params": out["trainable_params"],
           "train_loss_first": out["train_loss"][0], "train_loss_last": out["train_loss"][-1],
           "train_loss": out["train_loss"], "train_time_s": out["train_time_s"], "eval_time_s": out["eval_time_s"],
           "train_tokens_per_s": out["train_tokens_per_s"], "wall_s": wall,
           "cpu_s": time.process_time() - c0,
           "sampler_history": out["sampler_history"][-20:], **summarize(out["results_after"])}
    if out["results_before"] is not None:
        res["zero_shot"] = summarize(out["results_before"])
    if probe:
        res["diagnostics"] = diagnose(out["model"], probe, out["tasks"])
    del out
    print(f"   mean {res['mean']:.3f} | worst {res['worst']:.3f} ({res['worst_task']}) | "
          f"loss {res['train_loss_first']:.3f} -> {res['train_loss_last']:.3f} | {wall:.0f}s", flush=True)
    return res


def make_diagnostics_probe(s: Settings, data: Path, train: dict, tasks: list[str], tokenizer) -> dict:
    """The first ``probe_rows`` training rows of every task, encoded as in training."""
    from rlora.data import prompt_templates, tokenize_tasks
    from rlora.tracking.diagnostics import make_probe

    dcfg = run_config(s, data, "lora", s.r, "proportional").data
    first = {t: train[t][:s.probe_rows] for t in tasks}
    tokenized = tokenize_tasks(tokenizer, first, s.max_length, s.use_chat_template, prompt_templates(dcfg))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return make_probe(tokenized, tasks, pad, per_task=s.probe_rows)


def same_as_proportional(sizes, strategy: str, names) -> bool:
    """True when a static strategy's probabilities equal proportional's bit for bit (same draws)."""
    from rlora.config import SamplerConfig
    from rlora.sampler import compute_probabilities

    if strategy in ("proportional", "dynamic"):
        return strategy == "proportional"
    a = compute_probabilities(sizes, SamplerConfig(strategy="proportional"), names)
    b = compute_probabilities(sizes, SamplerConfig(strategy=strategy), names)
    return bool(np.array_equal(a, b))


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def git_stamp() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mean_se(summary: dict) -> float:
    """Binomial standard error of the task-mean accuracy: sqrt(sum_t p_t (1 - p_t) / n_t) / T."""
    acc, n = summary["accuracy"], summary["n"]
    return math.sqrt(sum(a * (1 - a) / max(n[t], 1) for t, a in acc.items())) / len(acc)


def markdown(report: dict) -> str:
    tasks = report["tasks"]
    s = report["settings"]
    lines = [f"# Multi-task quality: {', '.join(LABELS[m] for m in report['methods'])}",
             "",
             f"{'QUICK SMOKE RUN: too few steps and dev rows for the numbers to mean anything. ' if report['quick'] else ''}"
             f"commit `{report['commit']}`, {report['date']}, data `{report['data']}` ({len(tasks)} tasks), "
             f"base model `{s['model']}`, torch threads {s['threads']}, wall time {report['wall_s'] / 60:.1f} min.",
             "",
             f"Settings: adapters on {', '.join(s['target_modules'])}; multi-head r={s['r']}, N={s['heads']}; "
             f"LoRA rank {report['lora_rank']} (equal A+B budget); alpha = {s['alpha_per_rank']:g} x rank; dropout "
             f"{s['dropout']}; max_length {s['max_length']}, chat template {'on' if s['use_chat_template'] else 'off'}; "
             f"{s['steps']} steps x {s['batch_size']} rows, AdamW lr {s['learning_rate']:g}, warmup "
             f"{s['warmup_ratio']:g}, linear decay, clip {s['max_grad_norm']:g}, seed {s['seed']}; "
             f"{s['eval_examples']} dev rows per task (accuracy by option log-likelihood). Methods use the "
             f"proportional sampler; samplers use {LABELS[report['best_method']]}.",
             "",
             "| run | trainable params (A+B) | " + " | ".join(tasks) + " | mean | worst task |",
             "|---|---|" + "---|" * len(tasks) + "---|---|"]

    def row(name, summ, params):
        cells = " | ".join(f"{100 * summ['accuracy'][t]:.1f}" for t in tasks)
        return (f"| {name} | {params} | {cells} | **{100 * summ['mean']:.1f}** ± {100 * mean_se(summ):.1f} | "
                f"{100 * summ['worst']:.1f} ({summ['worst_task']}) |")

    lines.append(row("zero-shot base", report["zero_shot"], "0"))
    for m in report["methods"]:
        r = report["runs"][m]
        lines.append(row(f"{LABELS[m]} (rank {r['rank']})", r, f"{r['trainable_params']:,} ({r['budget']['ab']:,})"))
    for sname in report["samplers"]:
        r = report["sampler_runs"][sname]
        note = " (= proportional: same distribution)" if r.get("reused") and sname != "proportional" else ""
        lines.append(row(f"{LABELS[report['best_method']]} + {sname}{note}", r, f"{r['trainable_params']:,}"))
    lines += ["", "± is the binomial standard error of the task mean (dev rows are few: differences of about a "
              "point are within it).", ""]
    lines += diagnostics_table(report)
    lines += ["Targets:", ""]
    for name, f in report["figures"].items():
        if f["target"] != "info":
            ok = report["checks"].get(name)
            lines.append(f"- `{name}` = {f['value']:+.2f} {f['unit']} (target {f['target']}): "
                         f"{'holds' if ok else 'missed'}")
    return "\n".join(lines) + "\n"


def _fmt(v, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def diagnostics_table(report: dict) -> list[str]:
    """Head and task diagnostics of every trained run (empty when none were taken)."""
    runs = [(f"{LABELS[m]}", report["runs"][m]) for m in report["methods"]]
    runs += [(f"{LABELS[report['best_method']]} + {k}", r) for k, r in report["sampler_runs"].items()
             if not r.get("reused")]
    runs = [(name, r["diagnostics"]) for name, r in runs if r.get("diagnostics")]
    if not runs:
        return []
    tasks = report["tasks"]
    lines = ["Diagnostics after training (probe: the first "
             f"{report['settings']['probe_rows']} training rows of each task): head cosine = mean over layers "
             "of the mean pairwise cosine of the head updates B_i A (1 = collapsed heads); effective rank of "
             "each head's update (of r); router entropy H(g)/log N (1 = uniform routing); ‖Λ_t − I‖ (MTL); task "
             "interference = cosine between two tasks' adapter gradients (negative = they conflict), mean and "
             "most negative pair.", "",
             "| run | head cosine (B_i A) | effective rank | router entropy | ‖Λ_t − I‖ | interference mean | "
             "most conflicting pair |", "|---|---|---|---|---|---|---|"]
    for name, d in runs:
        pair = "–"
        if d.get("interference") is not None:
            c = np.array(d["interference"], dtype=float)
            np.fill_diagonal(c, np.inf)
            a, b = sorted(np.unravel_index(np.nanargmin(c), c.shape))
            pair = f"{tasks[a]} / {tasks[b]} ({c[a, b]:+.2f})"
        lines.append(f"| {name} | {_fmt(d.get('head_cos_BA'))} | {_fmt(d.get('eff_rank'), '.1f')} | "
                     f"{_fmt(d.get('router_entropy'))} | {_fmt(d.get('lambda_dev'))} | "
                     f"{_fmt(d.get('interference_mean'), '+.2f')} | {pair} |")
    return lines + [""]


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    cols = tasks + ["mean", "worst"]

    def values(summ):
        return [100 * summ["accuracy"][t] for t in tasks] + [100 * summ["mean"], 100 * summ["worst"]]

    panels = [("methods (proportional sampler)",
               [("zero-shot", report["zero_shot"])] + [(LABELS[m], report["runs"][m]) for m in report["methods"]]),
              (f"samplers ({LABELS[report['best_method']]})",
               [(s, report["sampler_runs"][s]) for s in report["samplers"]])]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.4 * len(cols)), 8), constrained_layout=True)
    for ax, (title, series) in zip(axes, panels):
        width = 0.8 / max(1, len(series))
        x = np.arange(len(cols))
        for k, (name, summ) in enumerate(series):
            ax.bar(x + (k - (len(series) - 1) / 2) * width, values(summ), width, label=name)
        ax.set_xticks(x, cols, rotation=20, ha="right")
        ax.set_ylabel("dev accuracy (%)")
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8, ncol=min(5, len(series)), loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{'QUICK SMOKE RUN - ' if report['quick'] else ''}{Path(report['data']).name}, "
                 f"{report['settings']['steps']} steps, commit {report['commit']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> dict:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="task directory in the JSONL interchange format")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (overrides the preset)")
    ap.add_argument("--eval-examples", type=int, default=None, help="dev rows per task (overrides the preset)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the adapter init, dropout and sampler (default 42)")
    ap.add_argument("--model", default=None, help="base model: 'smollm2-135m' (default) or a local HF model folder")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    s = Settings(**(QUICK if args.quick else {}))
    s.threads = args.threads or (1 if args.quick else s.threads)
    if args.steps:
        s.steps = args.steps
    if args.eval_examples:
        s.eval_examples = args.eval_examples
    if args.model:
        s.model = args.model
    if args.seed is not None:
        s.seed = args.seed
    data = Path(args.data).expanduser()
    if not data.is_absolute() and not data.exists():
        data = REPO / data
    data = data.resolve()
    if not data.is_dir():
        raise SystemExit(f"error: --data {data} is not a directory: pass a folder with one subfolder per task")
    torch.set_num_threads(s.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()

    from rlora.config import DataConfig
    from rlora.data import load_tasks
    from rlora.models import load_base_model, load_tokenizer

    train = load_tasks(DataConfig(path=str(data)), "train")
    tasks = list(train)
    sizes = [len(v) for v in train.values()]
    dev_sizes = [len(v) for v in load_tasks(DataConfig(path=str(data)), "dev").values()]
    tokenizer = load_tokenizer(s.model)
    probe = make_diagnostics_probe(s, data, train, tasks, tokenizer)
    shapes = module_shapes(load_base_model(s.model), s.target_modules)
    if not shapes:
        raise SystemExit(f"error: target modules {list(s.target_modules)} match no linear layer of {s.model}")
    rank_lora = lora_rank_for(shapes, s.r, s.heads)
    budgets = {m: budget(shapes, m, rank_lora if m == "lora" else s.r, s.heads, len(tasks)) for m in METHODS}
    gap = budgets["lora"]["ab"] / budgets["rlora"]["ab"] - 1
    print(f"data {data}: {len(tasks)} tasks {dict(zip(tasks, sizes))}")
    print(f"{len(shapes)} adapted modules; shared A+B budget: LoRA rank {rank_lora} -> {budgets['lora']['ab']:,}, "
          f"multi-head r={s.r} N={s.heads} -> {budgets['rlora']['ab']:,} ({100 * gap:+.2f}%)")
    for m in METHODS:
        b = budgets[m]
        print(f"  {LABELS[m]:10s} A+B {b['ab']:>10,}  + extra {b['extra']:>8,}  = {b['total']:>10,} trainable")
    if abs(gap) > 0.02:
        print(f"warning: the A+B budgets differ by {100 * gap:.1f}% (more than 2%)")

    runs: dict[str, dict] = {}
    for i, m in enumerate(METHODS):
        rank = rank_lora if m == "lora" else s.r
        runs[m] = train_one(s, data, m, rank, "proportional", tokenizer, eval_before=(i == 0), probe=probe)
        runs[m]["budget"] = budgets[m]
        if runs[m]["trainable_params"] != budgets[m]["total"]:
            raise SystemExit(f"error: {m} has {runs[m]['trainable_params']:,} trainable parameters, the budget "
                             f"formula says {budgets[m]['total']:,}")
    zero_shot = runs[METHODS[0]].pop("zero_shot")
    best = max(METHODS, key=lambda m: runs[m]["mean"])
    print(f"\nbest method by mean accuracy: {LABELS[best]}")

    sampler_runs: dict[str, dict] = {}
    for strat in SAMPLERS:
        if same_as_proportional(sizes, strat, tasks):
            sampler_runs[strat] = dict(runs[best], sampler=strat, reused=True)
            if strat != "proportional":
                print(f"\n== {strat}: same probabilities as proportional on this data (identical draws): reused")
        else:
            sampler_runs[strat] = train_one(s, data, best, rank_lora if best == "lora" else s.r, strat, tokenizer,
                                            eval_before=False, probe=probe)
    wall = time.time() - t_start

    # ---- figures and checks
    pts = lambda a, b: 100 * (a - b)  # noqa: E731
    figs = {
        "rlora_minus_lora_mean": figure(pts(runs["rlora"]["mean"], runs["lora"]["mean"]), ">=1", "points"),
        "mtl_minus_lora_mean": figure(pts(runs["mtl"]["mean"], runs["lora"]["mean"]), ">=1", "points"),
        "hydra_minus_lora_mean": figure(pts(runs["hydra"]["mean"], runs["lora"]["mean"]), "info", "points"),
        "rlora_minus_hydra_mean": figure(pts(runs["rlora"]["mean"], runs["hydra"]["mean"]), "info", "points"),
        "dynamic_minus_proportional_worst": figure(
            pts(sampler_runs["dynamic"]["worst"], sampler_runs["proportional"]["worst"]), ">=2", "points"),
        "dynamic_minus_proportional_mean": figure(
            pts(sampler_runs["dynamic"]["mean"], sampler_runs["proportional"]["mean"]), "info", "points"),
        "zero_shot_mean": figure(100 * zero_shot["mean"], "info", "%"),
        "best_mean": figure(100 * runs[best]["mean"], "info", "%"),
        "wall_minutes": figure(wall / 60, "info", "min"),
    }
    checks = {"rlora_minus_lora_mean": figs["rlora_minus_lora_mean"]["value"] >= 1,
              "mtl_minus_lora_mean": figs["mtl_minus_lora_mean"]["value"] >= 1,
              "dynamic_minus_proportional_worst": figs["dynamic_minus_proportional_worst"]["value"] >= 2}
    trained = list(runs.values()) + [r for r in sampler_runs.values() if not r.get("reused")]
    if args.quick:
        # the full grid at this run's measured speed: same runs, full steps and dev rows
        full = Settings()
        per_step = sum(r["train_time_s"] for r in trained) / sum(s.steps for _ in trained)
        eval_rows = sum(sum(r["n"].values()) for r in trained) + sum(zero_shot["n"].values())
        per_row = sum(r["eval_time_s"] for r in trained) / max(1, eval_rows)
        setup = sum(r["wall_s"] - r["train_time_s"] - r["eval_time_s"] for r in trained) / len(trained)
        full_rows = (len(trained) + 1) * sum(min(n, full.eval_examples) for n in dev_sizes)
        est = len(trained) * (setup + full.steps * per_step) + full_rows * per_row
        # on a busy machine this process got only part of a core: its CPU time is what an idle core needs
        busy = sum(r["cpu_s"] for r in trained) / sum(r["wall_s"] for r in trained)
        figs["full_grid_estimate_minutes"] = figure(est / 60, "info", "min")
        figs["full_grid_estimate_idle_core_minutes"] = figure(est * busy / 60, "info", "min")
        print(f"\nmeasured here (threads={s.threads}, load average {os.getloadavg()[0]:.1f}, this process used "
              f"{100 * busy:.0f}% of its wall time on CPU): {per_step:.2f} s/step, {per_row:.2f} s per dev row, "
              f"{setup:.0f} s setup per run\nfull grid ({len(trained)} trainings x {full.steps} steps, "
              f"{len(trained) + 1} evaluations, {full_rows:,} dev rows in all): ~{est / 60:.0f} min at this wall "
              f"speed, ~{est * busy / 60:.0f} min on one idle core (2 threads on 2 idle cores: less)")

    report = {"quick": args.quick, "commit": git_stamp(), "date": dt.datetime.now().isoformat(timespec="seconds"),
              "data": str(data), "tasks": tasks, "task_sizes": sizes, "dev_sizes": dev_sizes, "settings": dataclasses.asdict(s),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "lora_rank": rank_lora, "budget_gap": gap, "methods": METHODS, "samplers": SAMPLERS,
              "best_method": best, "zero_shot": zero_shot, "runs": runs, "sampler_runs": sampler_runs,
              "figures": figs, "checks": checks, "wall_s": wall}

    print()
    for name, ok in checks.items():
        print(f"target {name} {figs[name]['target']} {figs[name]['unit']}: {figs[name]['value']:+.2f} -> "
              f"{'holds' if ok else 'MISSED'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quality" + ("_quick" if args.quick else "") + (f"_seed{s.seed}" if s.seed != Settings.seed else "")
    md = markdown(report)
    (out / f"{stem}.md").write_text(md, encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float) + "\n", encoding="utf-8")
    chart(report, out / f"{stem}.png")
    print("\n" + md)
    print(f"wrote {out / stem}.md, .json, .png")
    emit("quality", figs, args.json)
    return report


if __name__ == "__main__":
    main()
