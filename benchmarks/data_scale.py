"""Training data at scale: rows in {10k, 100k, 1M} x tasks in {6, 200}, through the token cache.

The rows are synthetic, shaped like the shipped ones (examples/data/bigbench_default: inputs of 15-100
words drawn from the shipped inputs' words, 2, 3 or 5 options per task, the target one of them), written at
run time into a scratch folder (deleted at the end, never committed); the rows are split evenly over the
tasks. For every cell:

* **cold / warm setup** -- a Ray Train run with 2 workers through the product's driver (preflight,
  ``ray.init``, ``TorchTrainer``) and training loop on a tiny random model (hidden 64, 2 layers, the
  embedded tokenizer), 4 steps: ``setup`` is the seconds of a worker's ``Trainer.setup_data`` (tokenizer,
  token cache open or build, sampler), the larger of the two workers (``load_train_data`` alone is
  reported too). Cold: an empty token cache (one worker builds, the other waits on the lock); warm: the
  same run again (both workers map the built cache).
* **peak RSS per rank** -- the peak resident set (``_e2e.peak_rss_bytes``, VmHWM) of each worker process at the end of the warm run (the larger of
  the two). The growth figure is the largest row count's cell minus the smallest's, same task count.
* **tokenizer alone / cold build** -- per round, on a sample folder of the cell's shape (its task count,
  ``S`` rows: S = 12k with ``--quick``, 50k otherwise; the build's cost per row does not depend on the
  data's size, it streams): the seconds of ``tokenizer(prompts)`` alone (prompts rendered beforehand, not timed;
  batches of ``CHUNK_ROWS``) over the seconds of a cold cache build of the same rows (read, check, render,
  tokenise, write). 1 = the cache adds nothing to the tokenizer's own work; > 1 is possible, since the
  build calls the Rust tokenizer without its per-row Python conversion.
* **steps/s** -- one process, the warm caches of a task count open side by side, one training step each
  (read the sampler's rows from the cache, left-pad, forward + backward + SGD on the tiny model, batch 8)
  in turn, interleaved (``_common.interleaved_rounds``): steps/s per cell and the ratio largest / smallest
  row count per round.

* **diagnostics at T = 200** -- ``rlora train --local`` (a subprocess, as a user runs it) of SmolLM2-135M
  with MTL-LoRA on 200 synthetic tasks x 100 rows, ``DIAG_STEPS`` steps, every diagnostics setting at
  its default (a pass every 50 steps and at the end, ``diagnostics.max_time_fraction`` 0.10), MLflow in a
  sqlite file: the diagnostics seconds over the training seconds as the run's last console line
  ``[rlora] diagnostics step ...`` states them (all passes of the run together), the tasks each pass
  probed, and the distinct metric keys of the MLflow run (``MlflowClient.get_run(...).data.metrics``).

``--quick`` runs 10k and 100k rows (the 1M cells take tens of minutes on a 2-core machine) and 3 rounds.

Usage: ``python benchmarks/data_scale.py [--quick] [--json] [--rows 10000,100000,1000000] [--tasks 6,200]
[--diag-model smollm2-135m]``
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, figure, meets, parser, show  # noqa: E402

MAX_LENGTH = 256
RAY_STEPS = 4
DIAG_TASKS, DIAG_ROWS_PER_TASK, DIAG_STEPS = 200, 100, 60
SHIPPED = Path(__file__).resolve().parents[1] / "examples" / "data" / "bigbench_default"


# ---- synthetic rows -------------------------------------------------------------------------------
def _vocabulary() -> np.ndarray:
    """The distinct words of the shipped example inputs (read at run time), so that the synthetic rows
    have their tokens per word."""
    words = set()
    for path in sorted(SHIPPED.glob("*/train.jsonl")):
        with open(path) as fh:
            for line in fh:
                words.update(json.loads(line)["input"].split())
    return np.array(sorted(words), dtype=object)


def write_data(root: Path, rows: int, tasks: int, seed: int = 0) -> None:
    """``tasks`` task folders with ``rows / tasks`` train rows each (and 2 dev rows): inputs of 15-100
    words drawn from the shipped inputs' words, 2, 3 or 5 options of 1-3 words per task."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary()
    per = rows // tasks
    for t in range(tasks):
        name = f"task{t:03d}"
        k = int(rng.choice([2, 3, 5]))
        labels = [" ".join(vocab[rng.integers(0, len(vocab), rng.integers(1, 4))]) + f" {j}" for j in range(k)]
        folder = root / name
        folder.mkdir(parents=True)
        lengths = rng.integers(15, 101, per + 2)
        answers = rng.integers(0, k, per + 2)
        for split, lo, hi in (("train", 0, per), ("dev", per, per + 2)):
            with open(folder / f"{split}.jsonl", "w") as fh:
                for i in range(lo, hi):
                    text = " ".join(vocab[rng.integers(0, len(vocab), lengths[i])])
                    fh.write(json.dumps({"task": name, "id": f"{name}-{i}", "input": text + "?",
                                         "options": labels, "target": labels[answers[i]]}) + "\n")


# ---- configs ----------------------------------------------------------------------------------------
def run_cfg(data: Path, model: Path, out: Path, steps: int = RAY_STEPS):
    from rlora.config import validate_config

    return validate_config({
        "model": {"name_or_path": str(model)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "max_length": MAX_LENGTH},
        "sampler": {"strategy": "proportional"},
        "trainer": {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "seed": 0,
                    "output_dir": str(out), "logging_steps": 10 ** 6, "save_steps": 10 ** 6,
                    "resume_from_checkpoint": "never"},
        "deepspeed": {"stage": 2},
        "ray": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        "mlflow": {"enabled": False},
        "eval": {"max_examples_per_task": 0, "before_training": False},
        "diagnostics": {"enabled": False},
    })


# ---- the Ray part: setup time and RSS per worker ------------------------------------------------------
def _setup_worker(payload: dict) -> None:
    """A Ray Train worker: the product's training loop with ``setup_data`` timed; its record to a file."""
    from _e2e import peak_rss_bytes
    import types

    from rlora.config import RunConfig
    from rlora.train import data_setup
    from rlora.train.loop import Trainer
    from rlora.train.worker import RayRuntime

    rt = RayRuntime()
    trainer = Trainer(RunConfig.model_validate(payload["config"]), rt, payload["run"], progress=False)
    plain = Trainer.setup_data

    def timed(self):
        t0 = time.perf_counter()
        plain(self)
        self.setup_s = time.perf_counter() - t0

    trainer.setup_data = types.MethodType(timed, trainer)
    loaded = data_setup.load_train_data

    def timed_load(*args, **kwargs):
        t0 = time.perf_counter()
        out = loaded(*args, **kwargs)
        timed_load.seconds = time.perf_counter() - t0
        return out

    data_setup.load_train_data = timed_load
    summary = trainer.fit()
    rec = {"rank": rt.rank, "setup_s": trainer.setup_s, "data_s": timed_load.seconds, "note": trainer.data.cache_note,
           "peak_rss_bytes": peak_rss_bytes(), "train_seconds": summary["train_seconds"]}
    (Path(payload["out"]) / f"rank{rt.rank}.json").write_text(json.dumps(rec))


def ray_run(cfg, out: Path) -> tuple[list[dict], float]:
    """One Ray run (2 workers); the workers' records and the driver's preflight seconds."""
    import ray.cloudpickle
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from _e2e import fresh_run_name

    from rlora.train.launcher import preflight, start_run, storage_path

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    t0 = time.perf_counter()
    cfg = preflight(fresh_run_name(cfg))
    pre_s = time.perf_counter() - t0
    cfg, run, _ = start_run(cfg, None, local=False, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    TorchTrainer(
        _setup_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run": run, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RayRunConfig(name=run["run_name"], storage_path=storage_path(cfg),
                                failure_config=FailureConfig(max_failures=0),
                                checkpoint_config=CheckpointConfig(num_to_keep=1)),
    ).fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], pre_s


# ---- the cold build against the tokenizer alone --------------------------------------------------------
def build_vs_tokenizer(cfg, tokenizer, rounds: int) -> list[float]:
    """Per round: seconds of ``tokenizer(prompts)`` alone / seconds of a cold token-cache build of ``cfg``'s
    rows (the caller passes a sample folder of the cell's shape). The build reads, checks, renders,
    tokenises and writes; the tokenizer alone gets prompts rendered beforehand (not timed) in batches of
    ``CHUNK_ROWS``, as the build calls it. (A cap such as ``max_train_examples_per_task`` would not do as
    the sample: a capped task is still read and checked to its end.)"""
    from rlora.data.loading import iter_task, task_specs
    from rlora.data.prompts import PromptRenderer, uses_chat_template
    from rlora.data.token_cache import CHUNK_ROWS, open_or_build

    specs = task_specs(cfg.data)
    data = cfg.data
    add_special = not uses_chat_template(tokenizer, data.use_chat_template)
    prompts = []
    for spec in specs:
        render = PromptRenderer(tokenizer, data.use_chat_template, spec.prompt_template)
        prompts.append([render(ex) for ex in iter_task(spec, data, "train")])
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        cache = open_or_build(data, tokenizer)
        build_s = time.perf_counter() - t0
        assert cache.status == "built", cache.status
        shutil.rmtree(cache.folder)
        t0 = time.perf_counter()
        for task in prompts:
            for lo in range(0, len(task), CHUNK_ROWS):
                tokenizer(task[lo:lo + CHUNK_ROWS], add_special_tokens=add_special)
        out.append((time.perf_counter() - t0) / build_s)
    return out


# ---- steps/s ------------------------------------------------------------------------------------------
def steps_per_s(cfgs: dict, tokenizer, model_dir: Path, rounds: int, per_round: int) -> dict[int, list[float]]:
    """Seconds per training step of each cell (warm caches), interleaved: ``rows -> [per round]``."""
    import torch
    from transformers import AutoModelForCausalLM

    from _common import interleaved_rounds

    from rlora.train.batches import forward_loss, next_micro_batch
    from rlora.train.data_setup import load_train_data

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    fns = {}
    for rows, cfg in cfgs.items():
        data = load_train_data(cfg, tokenizer, 0, 2)

        def step(d=data):
            batch = next_micro_batch(d.sampler, d.tokenized, d.names, d.pad_id, "cpu")
            loss, _, _ = forward_loss(model, batch, len(d.names))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[rows] = step
    return interleaved_rounds(fns, rounds, per_round, warmup=2)


# ---- diagnostics and the MLflow record at many tasks -----------------------------------------------------
BUDGET_LINE = re.compile(r"\[rlora\] diagnostics step (\d+): probed (\d+)/(\d+) tasks .* in ([\d.]+)s, pass "
                         r"([\d.]+)s.*; diagnostics so far ([\d.]+)s = ([\d.]+)% of ([\d.]+)s training")


def read_budget_lines(console: str) -> list[dict]:
    """The ``[rlora] diagnostics step ...`` lines of a run's console: step, tasks probed, probe and pass
    seconds, the diagnostics seconds so far and the training seconds so far."""
    out = []
    for m in BUDGET_LINE.finditer(console):
        step, probed, tasks, probe_s, pass_s, spent_s, _, train_s = m.groups()
        out.append({"step": int(step), "probed": int(probed), "tasks": int(tasks), "probe_s": float(probe_s),
                    "pass_s": float(pass_s), "spent_s": float(spent_s), "train_s": float(train_s)})
    return out


def diagnostics_run(scratch: Path, model: str, tasks: int = DIAG_TASKS, rows_per_task: int = DIAG_ROWS_PER_TASK,
                    steps: int = DIAG_STEPS, extra: tuple = ()) -> dict:
    """``rlora train --local`` on ``tasks`` synthetic tasks with MTL-LoRA and the default diagnostics; the
    budget lines it printed and the number of distinct metric keys of its MLflow run."""
    import yaml
    from mlflow.tracking import MlflowClient

    data = scratch / f"diag-data-{tasks}"
    if not data.exists():
        write_data(data, tasks * rows_per_task, tasks)
    out = scratch / "diag-out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    cfg = {"model": {"name_or_path": model},
           "adapter": {"method": "mtl", "r": 8, "num_heads": 3, "alpha": 16},
           "data": {"path": str(data), "max_length": MAX_LENGTH},
           "trainer": {"max_steps": steps, "per_device_train_batch_size": 4, "learning_rate": 2e-4, "seed": 0,
                       "output_dir": str(out), "save_steps": 10 ** 6, "logging_steps": 10,
                       "resume_from_checkpoint": "never"},
           "ray": {"resources_per_worker": {"CPU": 2}},
           "mlflow": {"tracking_uri": uri},
           "eval": {"max_examples_per_task": 0, "before_training": False}}
    path = scratch / "diag.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "rlora.cli", "train", str(path), *extra, "--local"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"rlora train --local failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    lines = read_budget_lines(proc.stdout)
    run_id = re.search(r"\[rlora\] MLflow run: (\w+)", proc.stdout).group(1)
    keys = MlflowClient(uri).get_run(run_id).data.metrics
    shutil.rmtree(out, ignore_errors=True)
    return {"passes": lines, "metric_keys": len(keys), "console": proc.stdout}


def measure_task_count(tasks: int, rows_list: list[int], scratch: Path, model_dir: Path, tokenizer, rounds: int,
                       per_round: int, sample: int, figures: dict, table: list) -> None:
    """The cells of one task count (cold and warm Ray runs, the tokenizer ratio, steps/s): their console lines,
    rows appended to ``table`` and figures added to ``figures``."""
    cfgs, cells, ratio = {}, {}, {}
    for rows in rows_list:
        data = scratch / f"data-{rows}-{tasks}"
        t0 = time.perf_counter()
        write_data(data, rows, tasks)
        gen_s = time.perf_counter() - t0
        cfg = run_cfg(data, model_dir, scratch / "out")
        cold, cold_pre = ray_run(cfg, scratch / "rec" / f"{rows}-{tasks}-cold")
        warm, warm_pre = ray_run(cfg, scratch / "rec" / f"{rows}-{tasks}-warm")
        assert sum("built in" in r["note"] for r in cold) == 1, [r["note"] for r in cold]
        assert all("reused" in r["note"] for r in warm), [r["note"] for r in warm]
        sample_dir = scratch / f"sample-{rows}-{tasks}"
        write_data(sample_dir, min(rows, sample), tasks)
        ratio[rows] = build_vs_tokenizer(run_cfg(sample_dir, model_dir, scratch / "out"), tokenizer, rounds)
        shutil.rmtree(sample_dir)
        n = (rows // tasks) * tasks
        cell = {"rows": n, "tasks": tasks, "generate_s": gen_s,
                "cold_setup_s": max(r["setup_s"] for r in cold), "cold_data_s": max(r["data_s"] for r in cold),
                "warm_setup_s": max(r["setup_s"] for r in warm), "warm_data_s": max(r["data_s"] for r in warm),
                "preflight_cold_s": cold_pre, "preflight_warm_s": warm_pre,
                "peak_rss_mib": max(r["peak_rss_bytes"] for r in warm) / 2 ** 20,
                "cold_peak_rss_mib": max(r["peak_rss_bytes"] for r in cold) / 2 ** 20,
                "build_vs_tokenizer": float(np.median(ratio[rows]))}
        cells[rows], cfgs[rows] = cell, cfg
        print(f"rows {n:>8} tasks {tasks:>3}: setup cold {cell['cold_setup_s']:7.1f}s (data {cell['cold_data_s']:.1f}s) "
              f"warm {cell['warm_setup_s']:5.2f}s (data {cell['warm_data_s']:.2f}s)  peak RSS/rank warm "
              f"{cell['peak_rss_mib']:5.0f} MiB cold {cell['cold_peak_rss_mib']:5.0f} MiB  tokenizer alone / build "
              f"{show(ratio[rows])}  preflight cold {cold_pre:5.1f}s warm {warm_pre:4.1f}s", flush=True)
    per_step = steps_per_s(cfgs, tokenizer, model_dir, rounds, per_round)
    for rows, cell in cells.items():
        cell["steps_per_s"] = 1 / float(np.median(per_step[rows]))
        table.append(cell)
        tag = f"{rows // 1000}k" if rows < 10 ** 6 else f"{rows // 10 ** 6}M"
        big = rows >= 10 ** 6
        figures[f"warm_setup_s_{tag}_T{tasks}"] = figure(cell["warm_setup_s"], "<=10" if big else "info", "s")
        figures[f"warm_load_train_data_s_{tag}_T{tasks}"] = figure(cell["warm_data_s"], "info", "s")
        figures[f"cold_setup_s_{tag}_T{tasks}"] = figure(cell["cold_setup_s"], "info", "s")
        figures[f"peak_rss_per_rank_mib_{tag}_T{tasks}"] = figure(cell["peak_rss_mib"], "info", "MiB")
        figures[f"build_vs_tokenizer_{tag}_T{tasks}"] = figure(ratio[rows], ">=0.7", "x")
        figures[f"steps_per_s_{tag}_T{tasks}"] = figure([1 / v for v in per_step[rows]], "info", "steps/s")
    lo, hi = min(cells), max(cells)
    if lo != hi:
        span = f"{lo // 1000}k_to_{hi // 1000}k"
        growth = cells[hi]["peak_rss_mib"] - cells[lo]["peak_rss_mib"]
        figures[f"rss_growth_mib_{span}_T{tasks}"] = figure(growth, "<=300", "MiB")
        steps = [a / b for a, b in zip(per_step[lo], per_step[hi])]
        figures[f"steps_per_s_ratio_{span}_T{tasks}"] = figure(steps, ">=0.95", "x")
        print(f"T={tasks}: peak RSS/rank growth {lo} -> {hi} rows {growth:.0f} MiB; steps/s at {hi} / at {lo} rows "
              f"{show(steps)}", flush=True)
    for rows in rows_list:  # free the disk before the next task count
        shutil.rmtree(scratch / f"data-{rows}-{tasks}", ignore_errors=True)
    from rlora.data.token_cache import clear

    clear()


def diagnostics_figures(scratch: Path, model: str, figures: dict) -> None:
    """The T=200 diagnostics run (:func:`diagnostics_run`): its console lines and figures."""
    diag = diagnostics_run(scratch, model)
    passes = diag["passes"]
    last = passes[-1]
    share = last["spent_s"] / last["train_s"]
    for ps in passes:
        print(f"T={DIAG_TASKS} diagnostics step {ps['step']}: probed {ps['probed']}/{ps['tasks']} tasks in "
              f"{ps['probe_s']:.1f}s, pass {ps['pass_s']:.1f}s", flush=True)
    print(f"T={DIAG_TASKS}: diagnostics {last['spent_s']:.1f}s of {last['train_s']:.1f}s training "
          f"({100 * share:.1f}%), {diag['metric_keys']} distinct MLflow metric keys", flush=True)
    figures[f"diagnostics_over_training_T{DIAG_TASKS}"] = figure(share, "<=0.10", "x")
    figures[f"mlflow_metric_keys_T{DIAG_TASKS}"] = figure(diag["metric_keys"], "<=2000", "keys", spread=0)
    figures[f"diagnostics_pass_s_T{DIAG_TASKS}"] = figure([ps["pass_s"] for ps in passes], "info", "s")
    figures[f"diagnostics_tasks_probed_T{DIAG_TASKS}"] = figure([ps["probed"] for ps in passes], "info",
                                                               "tasks")
    figures[f"diagnostics_train_s_T{DIAG_TASKS}"] = figure(last["train_s"], "info", "s")


# ---- main ---------------------------------------------------------------------------------------------
def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", default=None, help="row counts, comma-separated (default 10000,100000,1000000; "
                   "--quick: 10000,100000)")
    p.add_argument("--tasks", default="6,200", help="task counts (comma-separated)")
    p.add_argument("--scratch", default=None, help="scratch folder (default: a temporary folder, removed)")
    p.add_argument("--diag-model", default="smollm2-135m", help="base model of the diagnostics run at T=200 "
                   "(default: the embedded SmolLM2-135M); 'none' leaves that part out")
    p.add_argument("--diag-only", action="store_true", help="only the diagnostics run at T=200")
    args = p.parse_args()
    rows_list = [int(x) for x in (args.rows or ("10000,100000" if args.quick else "10000,100000,1000000")).split(",")]
    tasks_list = [int(x) for x in args.tasks.split(",")]
    rounds, per_round = (3, 10) if args.quick else (5, 20)
    sample = 12_000 if args.quick else 50_000

    from _e2e import random_model, stop_ray

    from rlora.models import load_tokenizer

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="rlora-data-scale-"))
    os.environ["RLORA_TOKEN_CACHE"] = str(scratch / "tokens")
    model_dir, _ = random_model(scratch / "model", "tiny")
    tokenizer = load_tokenizer(str(model_dir))
    figures: dict = {}
    table = []
    try:
        for tasks in ([] if args.diag_only else tasks_list):
            measure_task_count(tasks, rows_list, scratch, model_dir, tokenizer, rounds, per_round, sample,
                               figures, table)
        if args.diag_model != "none":
            diagnostics_figures(scratch, args.diag_model, figures)
    finally:
        stop_ray()
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n| rows | tasks | cold setup s | warm setup s | peak RSS/rank MiB | tokenizer alone / cold build | steps/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c in table:
        print(f"| {c['rows']:,} | {c['tasks']} | {c['cold_setup_s']:.1f} | {c['warm_setup_s']:.2f} | {c['peak_rss_mib']:.0f} | "
              f"{c['build_vs_tokenizer']:.2f} | {c['steps_per_s']:.1f} |")
    for name, f in figures.items():
        ok = meets(f["value"], f["target"])
        if ok is not None:
            print(f"{name}: {f['value']} (target {f['target']}: {'met' if ok else 'NOT met'})")
    emit("data_scale", figures, args.json)


if __name__ == "__main__":
    main()
