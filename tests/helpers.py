"""Helpers shared by the tests (importable as `helpers`: pyproject sets pythonpath = tests)."""
import json
import random
import socket
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
DEMO_DATA = REPO / "examples" / "data" / "bigbench_default"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (``<name>_bench``), e.g. to call its ``main(argv)``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def tiny_llama(vocab=128, hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def write_tasks(root: Path, n_train: int = 48, n_dev: int = 8, seed: int = 0) -> Path:
    """Three small synthetic tasks whose answers are learnable from the prompt."""
    rng = random.Random(seed)
    makers = {
        "parity": lambda i: (f"Is {i} even or odd?", ["even", "odd"], "even" if i % 2 == 0 else "odd"),
        "sign": lambda i: (f"Is {i - 50} negative or not?", ["negative", "positive"],
                           "negative" if i < 50 else "positive"),
        "size": lambda i: (f"Is {i} a big or small number?", ["small", "big"], "small" if i < 50 else "big"),
    }
    for task, make in makers.items():
        d = root / task
        d.mkdir(parents=True, exist_ok=True)
        nums = rng.sample(range(100), n_train + n_dev)
        for split, part in (("train", nums[:n_train]), ("dev", nums[n_train:])):
            with open(d / f"{split}.jsonl", "w") as f:
                for i in part:
                    text, options, target = make(i)
                    f.write(json.dumps({"task": task, "id": f"{task}-{i}", "input": text, "options": options,
                                        "target": target}) + "\n")
    return root


def run_config(model_dir, data_dir, out_dir, **overrides):
    """A RunConfig for the tiny model, with dotted overrides (e.g. deepspeed__stage=3 → deepspeed.stage=3)."""
    from rlora.config import apply_overrides, validate_config

    raw = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"method": "rlora", "r": 4, "num_heads": 2, "alpha": 8, "dropout": 0.0,
                    "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "data": {"path": str(data_dir), "max_length": 64},
        "sampler": {"strategy": "proportional"},
        "trainer": {"max_steps": 6, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "seed": 7,
                    "output_dir": str(out_dir), "logging_steps": 1, "save_steps": 3, "warmup_ratio": 0.0},
        "deepspeed": {"stage": 2},
        "ray": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        "mlflow": {"experiment_name": "tests"},
        "eval": {"max_examples_per_task": 4, "before_training": False},
    }
    raw = apply_overrides(raw, [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()])
    return validate_config(raw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(root: int | None = None) -> list[int]:
    """Pids of live Ray Train worker processes started under ``root`` (default: this process), so a
    test never touches Ray processes that other programs on the machine started."""
    import os

    import psutil

    try:
        procs = psutil.Process(root or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any("RayTrainWorker" in part for part in p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


# console lines a user cannot act on: they belong in the run's log file, never on the console
NOISE = [r"Setting accelerator to CPU", r"FutureWarning", r"DeprecationWarning", r"Checkpoint successfully created",
         r"Reporting training result", r"PreemptionWatcher", r"fontManager", r"core_worker", r"\(RayTrainWorker",
         r"\(TrainController", r"Traceback", r"-laio", r"\bWARNING\b", r"UserWarning"]


def rows_drawn(sampler_state: dict) -> int:
    """Rows the sampler handed out to all ranks together: per task, epochs x size + cursor."""
    sizes = sampler_state["fingerprint"]["task_sizes"]
    return sum(e * n + c for e, c, n in zip(sampler_state["epochs"], sampler_state["cursors"], sizes))


def tracked_run(cfg, tmp_path: Path, run_name: str) -> dict:
    """An MLflow run (sqlite in ``tmp_path``) for the training loop to log into: the loop's ``run`` keys."""
    from rlora.tracking import mlflow_tracker as mt

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.mlflow.tracking_uri, cfg.mlflow.enabled = uri, True
    run_id, _ = mt.start_or_resume_run(cfg, run_name)
    return {"mlflow_run_id": run_id, "tracking_uri": uri}
