"""End-to-end training pieces shared by train_throughput.py, memory.py and gpu_check.py.

* :func:`run_config` -- one rlora config for every side of a comparison (method, rank, targets, input
  dropout, batch, steps, ZeRO stage, threads).
* :func:`run_rlora` -- rlora through the product's in-process loop (``rlora.train.local.train_local``),
  optionally with the LM head on every position (``full_lm_head=True``) as Hugging Face models compute
  it, and recording the rows each step trained on.
* :func:`run_peer` -- Hugging Face ``Trainer`` + PEFT LoRA on the *same rows in the same order* (the
  rows rlora's sampler draws, fed through a ``SequentialSampler``), the same hyper-parameters and
  threads; tokens counted as rlora counts them (non-padding tokens of the steps after the first).
* :func:`run_ray_measured` -- the product's Ray Train driver steps (``preflight``, ``start_run``: Ray up,
  resources, run folder) and the launcher's ``TorchTrainer`` settings, with workers that run the
  product's :class:`rlora.train.loop.Trainer` and then record their own peak memory (``ru_maxrss``;
  ``torch.cuda.max_memory_allocated`` on GPU) and the bytes their parameters, gradients and optimizer
  state hold.
* :func:`random_model` -- a random-initialised Hugging Face folder of Qwen2.5-0.5B / 1.5B shape (or a
  tiny one) with the embedded model's tokenizer; the vocabulary is set to the tokenizer's.

What "equal work" leaves different, by design of each product: rlora left-pads and its loss pushes only
the answer positions through the softmax (the LM head matmul runs on every position with
``full_lm_head``), HF's loss takes log-softmax over every position; rlora steps through a DeepSpeed
engine (ZeRO stage as configured, world size 1), the peer through plain ``torch.optim.AdamW``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "bigbench_default"
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
R, ALPHA, DROPOUT = 8, 16.0, 0.05

# Qwen2.5 shapes (hidden, intermediate, layers, attention heads, kv heads); vocab: the tokenizer's
QWEN_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


# ---- config ---------------------------------------------------------------------------------------
def run_config(steps: int, out: str, *, stage: int = 2, threads: int = 1, method: str = "lora",
               model: str = "smollm2-135m", data: Path = DATA, batch: int = 4, max_length: int = 128,
               rows_per_task: int = 200, workers: int = 1, use_gpu: bool = False, bf16: bool = False,
               targets: Optional[list[str]] = None):
    """The rlora config of every side. LoRA r=8, alpha 16, input dropout 0.05 (as PEFT), AdamW, lr 5e-4,
    linear schedule with 5 % warm-up, clipping 1.0; no evaluation, diagnostics, MLflow or mid-run saves."""
    from rlora.config import validate_config

    return validate_config({
        "model": {"name_or_path": str(model)},
        "adapter": {"method": method, "r": R, "alpha": ALPHA, "num_heads": 3, "dropout": DROPOUT,
                    "target_modules": targets or TARGETS},
        "data": {"path": str(data), "max_length": max_length, "max_train_examples_per_task": rows_per_task},
        "sampler": {"strategy": "proportional"},
        "trainer": {"max_steps": steps, "per_device_train_batch_size": batch, "learning_rate": 5e-4, "seed": 0,
                    "output_dir": out, "logging_steps": 10 ** 6, "save_steps": 10 ** 6, "bf16": bf16,
                    "run_name": f"bench-{uuid.uuid4().hex[:10]}", "resume_from_checkpoint": "never"},
        "deepspeed": {"stage": stage},
        "ray": {"num_workers": workers, "use_gpu": use_gpu, "resources_per_worker": {"CPU": threads}},
        "mlflow": {"enabled": False},
        "eval": {"max_examples_per_task": 0, "before_training": False},
        "diagnostics": {"enabled": False},
    })


def fresh_run_name(cfg):
    """A copy of ``cfg`` with a new run name (a Ray run never resumes an earlier run's checkpoint)."""
    cfg = cfg.model_copy(deep=True)
    cfg.trainer.run_name = f"bench-{uuid.uuid4().hex[:10]}"
    return cfg


# ---- memory ---------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: ``VmHWM`` of ``/proc/self/status`` (Linux), else
    ``getrusage`` ru_maxrss (KiB). Not ru_maxrss on Linux: ``execve`` keeps the larger of the old image's
    peak and the new one's, so a process started from a large one (a test runner, a benchmark driver)
    would report its parent's peak; VmHWM belongs to this process image alone."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def held_bytes(engine) -> dict[str, int]:
    """Bytes held by this process's parameters (its ZeRO-3 partition where partitioned), gradients and
    optimizer state (moments, fp32 partitions and flat buffers), each storage counted once."""
    seen: set[tuple[str, int]] = set()
    out = {"params": 0, "grads": 0, "optimizer": 0}

    def add(t, bucket: str) -> None:
        if not torch.is_tensor(t) or t.numel() == 0:
            return
        st = t.untyped_storage()
        key = (str(st.device), st.data_ptr())
        if key not in seen:
            seen.add(key)
            out[bucket] += st.nbytes()

    def walk(obj, bucket: str, depth: int) -> None:
        if torch.is_tensor(obj):
            add(obj, bucket)
        elif depth > 0 and isinstance(obj, dict):
            for v in obj.values():
                walk(v, bucket, depth - 1)
        elif depth > 0 and isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, bucket, depth - 1)

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", None), "params")
        add(p.data, "params")
    for p in engine.module.parameters():
        add(p.grad, "grads")
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for o in {id(opt): opt, id(inner): inner}.values():
        walk(getattr(o, "state", {}), "optimizer", 3)
        for v in vars(o).values():
            if not isinstance(v, torch.nn.Module):
                walk(v, "optimizer", 2)
    return out


# ---- rlora in process -----------------------------------------------------------------------------
@contextlib.contextmanager
def observed_batches(full_lm_head: bool) -> Iterator[list[list[tuple[int, ...]]]]:
    """Record the input ids of every micro-batch the loop builds; ``full_lm_head``: ask the model for the
    logits of every position (``logits_to_keep`` = the batch width) instead of the answer tail."""
    import rlora.train.batches as batches

    seen: list[list[tuple[int, ...]]] = []
    original = batches.left_padded_batch

    def patched(features, pad_token_id, task_ids):
        seen.append([tuple(int(t) for t in f["input_ids"]) for f in features])
        out = original(features, pad_token_id, task_ids)
        if full_lm_head:
            out["keep"] = out["input_ids"].shape[1]
        return out

    batches.left_padded_batch = patched
    try:
        yield seen
    finally:
        batches.left_padded_batch = original


def run_rlora(cfg, full_lm_head: bool = False, model=None) -> dict[str, Any]:
    """Train through ``train_local``; tokens/s, time to first step, the rows of each step, peak memory."""
    from rlora.train.local import train_local

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with observed_batches(full_lm_head) as seen:
        res = train_local(cfg, model=model, progress=False)
    out = {"tokens_per_s": res["train_tokens_per_s"], "first_step_s": res["time_to_first_step_s"],
           "trainable": res["trainable_params"], "rows": seen, "loss": res["train_loss"],
           "peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


# ---- the peer: HF Trainer + PEFT -----------------------------------------------------------------------
def ordered_rows(cfg, tokenizer) -> list[dict]:
    """The training rows in the order rlora's loop draws them (rank 0 of 1: the product's sampler, seed
    and tokenisation), one micro-batch after another."""
    from rlora.train.data_setup import load_train_data

    cfg = cfg.model_copy(deep=True)
    d = load_train_data(cfg, tokenizer, 0, 1)
    n = d.total_steps * cfg.trainer.gradient_accumulation_steps
    return [d.tokenized[d.names[t]][i] for _ in range(n) for t, i in d.sampler.next_batch()]


def run_peer(cfg, threads: int = 1, use_gpu: bool = False, bf16: bool = False, model=None) -> dict[str, Any]:
    """HF ``Trainer`` + PEFT LoRA (r, alpha, input dropout and targets as rlora's) on :func:`ordered_rows`
    with ``train_sampling_strategy="sequential"`` (no shuffling), the Trainer's own loss (logits and
    log-softmax on every position), torch AdamW, the same LR schedule, clipping, seed and threads."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from rlora.data import collate
    from rlora.models import load_base_model, load_tokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.model.name_or_path)
    rows = ordered_rows(cfg, tok)
    bs, steps = cfg.trainer.per_device_train_batch_size, cfg.trainer.max_steps
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collator(feats):
        b = collate(feats, pad, [0] * len(feats))
        return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = model if model is not None else load_base_model(cfg.model.name_or_path)
    a = cfg.adapter
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                             target_modules=list(a.target_modules), task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if use_gpu:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    import tempfile

    t = cfg.trainer
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=bs, max_steps=steps, learning_rate=t.learning_rate,
            lr_scheduler_type="linear", warmup_steps=int(math.ceil(t.warmup_ratio * steps)),
            weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim="adamw_torch",
            train_sampling_strategy="sequential", logging_steps=10 ** 6, save_strategy="no", report_to=[],
            dataloader_num_workers=0, use_cpu=not use_gpu, bf16=bf16, seed=t.seed, disable_tqdm=True,
            remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()])
        result = trainer.train()
    tokens_after_first = sum(len(r["input_ids"]) for r in rows[bs:bs * steps])
    steady = marks[-1] - marks[0]
    out = {"tokens_per_s": tokens_after_first / steady if steady > 0 else None, "first_step_s": marks[0] - t0,
           "trainable": trainable, "rows": [[tuple(int(x) for x in r["input_ids"]) for r in rows[i:i + bs]]
                                            for i in range(0, bs * steps, bs)],
           "train_loss": float(result.training_loss), "peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


# ---- one side in a fresh process -------------------------------------------------------------------
SIDES = ("full", "peer", "answer")  # rlora with the full LM head, HF Trainer + PEFT, rlora as shipped


def run_side(side: str, steps: int, *, threads: int = 1, model: str = "smollm2-135m", stage: int = 2,
             batch: int = 4, max_length: int = 128, rows_per_task: int = 200, use_gpu: bool = False,
             bf16: bool = False) -> dict[str, Any]:
    """Train one side in a fresh Python process (no state, thread setting, process group or allocator
    history shared with another side) and return its measurements; ``rows_sha1`` identifies the rows of
    every step in order."""
    import subprocess

    if side not in SIDES:
        raise ValueError(f"side {side!r} is unknown: use one of {SIDES}")
    cmd = [sys.executable, str(Path(__file__).resolve()), side, str(steps), "--threads", str(threads), "--model",
           str(model), "--stage", str(stage), "--batch", str(batch), "--max-length", str(max_length),
           "--rows-per-task", str(rows_per_task)] + (["--gpu"] if use_gpu else []) + (["--bf16"] if bf16 else [])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"the {side} training process failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _side_main(argv: list[str]) -> None:
    import argparse
    import hashlib
    import tempfile

    p = argparse.ArgumentParser(description="train one side of a comparison; print its measurements")
    p.add_argument("side", choices=SIDES)
    p.add_argument("steps", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rows-per-task", type=int, default=200)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args(argv)
    env_threads(a.threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(a.steps, out, stage=a.stage, threads=a.threads, model=a.model, batch=a.batch,
                         max_length=a.max_length, rows_per_task=a.rows_per_task, use_gpu=a.gpu, bf16=a.bf16)
        if a.side == "peer":
            res = run_peer(cfg, threads=a.threads, use_gpu=a.gpu, bf16=a.bf16)
        else:
            res = run_rlora(cfg, full_lm_head=a.side == "full")
    rows = res.pop("rows")
    res["steps_seen"] = len(rows)
    res["rows_sha1"] = hashlib.sha1(json.dumps(rows).encode()).hexdigest()
    res["threads"] = torch.get_num_threads()
    print(json.dumps({k: v for k, v in res.items() if k not in ("loss", "train_loss")}), flush=True)


# ---- rlora on Ray Train, measured in each worker ----------------------------------------------------
def _measured_worker(payload: dict) -> None:
    """A Ray Train worker: the product's training loop, then this process's memory figures to a file."""
    import torch as th

    from rlora.config import RunConfig
    from rlora.train.loop import Trainer
    from rlora.train.worker import RayRuntime

    import torch.distributed as dist

    rt = RayRuntime()
    if th.cuda.is_available():
        th.cuda.reset_peak_memory_stats()
    trainer = Trainer(RunConfig.model_validate(payload["config"]), rt, payload["run"], progress=False)
    with observed_batches(bool(payload.get("full_lm_head"))):
        summary = trainer.fit()
    module = trainer.engine.module
    rec = {"rank": rt.rank, "world": rt.world_size, "peak_rss_bytes": peak_rss_bytes(),
           "backend": dist.get_backend() if dist.is_initialized() else None,
           "attn": getattr(getattr(module, "config", None), "_attn_implementation", None),
           "tokens_per_s": summary["train_tokens_per_s"], "first_step_s": summary["time_to_first_step_s"],
           "train_seconds": summary["train_seconds"], "train_loss": summary["train_loss"],
           "trainable": summary["trainable_params"], **held_bytes(trainer.engine)}
    if th.cuda.is_available():
        rec["cuda_peak_bytes"] = th.cuda.max_memory_allocated()
    path = Path(payload["out"]) / f"rank{rt.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def run_ray_measured(cfg, out_dir: Path, full_lm_head: bool = False) -> list[dict]:
    """Ray Train through the product's driver steps (``start_run``: preflight, ``ray.init``, resources) and
    the launcher's ``TorchTrainer`` settings; each worker writes its record; returns them by rank.
    ``full_lm_head``: the workers compute the logits of every position (see :func:`observed_batches`)."""
    import ray.cloudpickle
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rlora.train.launcher import preflight, start_run, storage_path

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg, run, _ = start_run(preflight(fresh_run_name(cfg)), None, local=False)
    out_dir = Path(out_dir)
    trainer = TorchTrainer(
        _measured_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run": run, "out": str(out_dir),
                           "full_lm_head": full_lm_head},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=dict(cfg.ray.resources_per_worker)),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RayRunConfig(name=run["run_name"], storage_path=storage_path(cfg),
                                failure_config=FailureConfig(max_failures=0),
                                checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()
    recs = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(cfg.ray.num_workers)]
    return recs


# ---- a random-initialised model of a given shape ------------------------------------------------------
def random_model(folder: Path, shape: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> tuple[Path, int]:
    """Write a random-initialised Qwen2 causal LM of ``shape`` (a key of ``QWEN_SHAPES``) and the embedded
    model's tokenizer to ``folder`` (reused when already there); returns (folder, parameter count).
    ``device``: where the weights are drawn (a GPU draws 1.5 B weights in a second); ``dtype``: as saved."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlora.models import load_tokenizer

    if shape not in QWEN_SHAPES:
        raise SystemExit(f"model shape {shape!r} is unknown: use one of {sorted(QWEN_SHAPES)}")
    folder = Path(folder)
    done = folder / "rlora_random_model.json"
    if done.is_file() and json.loads(done.read_text()).get("shape") == shape:
        return folder, int(json.loads(done.read_text())["params"])
    tok = load_tokenizer("smollm2-135m")
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **QWEN_SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model: Any = Qwen2ForCausalLM(cfg).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    done.write_text(json.dumps({"shape": shape, "params": n, "seed": seed}))
    return folder, n


def stop_ray() -> None:
    """Shut Ray down (if this process started it), so that its log lines end before the --json line."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def gib(n: float) -> float:
    return n / 2 ** 30


def env_threads(threads: int) -> None:
    """Pin torch's intra-op threads (and OpenMP's for child processes)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


if __name__ == "__main__":
    _side_main(sys.argv[1:])
