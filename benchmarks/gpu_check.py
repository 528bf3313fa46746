"""End-to-end part of the one-GPU check (run by benchmarks/gpu_check.sh): rlora on 1 Ray Train worker (NCCL,
bf16 autocast, SDPA attention, ZeRO-2) beside Hugging Face Trainer + PEFT in this process, on

  * the embedded model (SmolLM2-135M), and
  * a random-initialised model of Qwen2.5-1.5B shape (hidden 1536, intermediate 8960, 28 layers, 12 heads,
    2 KV heads, tied embeddings; the embedded tokenizer's 49,152-token vocabulary: 1.31 B parameters).

Both sides train LoRA r=8 with input dropout on q/v/o/down_proj, on the same rows in the same order, with
the same batch and steps. Per model it reports tokens/s of

  rlora with the LM head on every position (equal work) / HF Trainer + PEFT   -> {model}_rlora_vs_hf_peft
  rlora as shipped (LM head on the answer tail)                                -> {model}_rlora_shipped_tokens_per_s

the model FLOPs utilisation of both equal-work sides, and each side's peak GPU memory
(``torch.cuda.max_memory_allocated``, measured in the worker for rlora). MFU counts the useful work of
LoRA training on a frozen base, per token::

    4 * (P_linear + d * V) + 8 * n_layers * s * d       (forward + input-gradient backward; s = mean row length)

with ``P_linear`` the decoder's linear weights and ``d * V`` the LM head on every position (the adapter's own
FLOPs are left out), over ``--peak-tflops`` (989: H200 bf16 dense).

``--dry-run``: on CPU (gloo, bf16 autocast) with tiny random models, 3 steps: checks the mechanics only; the
memory figures are then peak RSS.

    python benchmarks/gpu_check.py [--dry-run] [--quick] [--json] [--steps N] [--peak-tflops T]
    python benchmarks/gpu_check.py --flatten NAME < last-line   # a benchmark's --json line -> one line per figure

``--quick``: 10 steps per training instead of 30 on the GPU (the dry run always takes 3).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, parser, positive_int  # noqa: E402
from _e2e import gib, random_model, run_config, run_ray_measured, run_side, stop_ray  # noqa: E402

H200_BF16_TFLOPS = 989.0


def flops_per_token(model_dir: str, mean_len: float) -> float:
    """Useful FLOPs of one token of LoRA training on a frozen base (see the module docstring)."""
    from transformers import AutoConfig

    from rlora.models import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(model_dir)[0])
    d, L, V, ffn = c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    p_linear = L * (d * q + 2 * d * kv + q * d + 3 * d * ffn)
    return 4.0 * (p_linear + d * V) + 8.0 * L * mean_len * d


def mean_row_length(cfg) -> float:
    from rlora.models import load_tokenizer
    from _e2e import ordered_rows

    rows = ordered_rows(cfg, load_tokenizer(cfg.model.name_or_path))
    return sum(len(r["input_ids"]) for r in rows) / max(1, len(rows))


def check_model(label: str, model: str, cfg_kw: dict, work: Path, peak_tflops: float, gpu: bool,
                figures: dict) -> None:
    cfg = run_config(model=model, **cfg_kw)
    flops = flops_per_token(model, mean_row_length(cfg))
    eq = run_ray_measured(cfg, work / f"{label}-equal", full_lm_head=True)[0]
    shipped = run_ray_measured(cfg, work / f"{label}-shipped")[0]
    peer = run_side("peer", cfg_kw["steps"], threads=cfg_kw["threads"], model=model, batch=cfg_kw["batch"],
                    max_length=cfg_kw["max_length"], rows_per_task=cfg_kw["rows_per_task"], use_gpu=gpu,
                    bf16=cfg_kw["bf16"])
    mem_key = "cuda_peak_bytes" if gpu else "peak_rss_bytes"
    extra = {"device": "cuda" if gpu else "cpu", "backend": eq.get("backend"), "attn": eq.get("attn")}
    print(f"{label}: rlora equal work {eq['tokens_per_s']:.0f} tok/s, shipped {shipped['tokens_per_s']:.0f} tok/s, "
          f"HF Trainer + PEFT {peer['tokens_per_s']:.0f} tok/s; peak memory rlora {gib(eq[mem_key]):.2f} GiB, "
          f"peer {gib(peer[mem_key]):.2f} GiB ({'max_memory_allocated' if gpu else 'peak RSS'}); "
          f"backend {extra['backend']}, attention {extra['attn']}", file=sys.stderr, flush=True)

    def put(name: str, value: float, target: str, unit: str) -> None:
        figures[f"{label}_{name}"] = {**figure(value, target, unit), **extra}

    put("rlora_vs_hf_peft", eq["tokens_per_s"] / peer["tokens_per_s"], ">=1.0", "x")
    put("rlora_tokens_per_s", eq["tokens_per_s"], "info", "tok/s")
    put("rlora_shipped_tokens_per_s", shipped["tokens_per_s"], "info", "tok/s")
    put("hf_peft_tokens_per_s", peer["tokens_per_s"], "info", "tok/s")
    put("rlora_mfu", 100 * eq["tokens_per_s"] * flops / (peak_tflops * 1e12), "info", "%")
    put("hf_peft_mfu", 100 * peer["tokens_per_s"] * flops / (peak_tflops * 1e12), "info", "%")
    put("rlora_peak_mem_gib", gib(eq[mem_key]), "info", "GiB")
    put("hf_peft_peak_mem_gib", gib(peer[mem_key]), "info", "GiB")
    put("rlora_vs_hf_peft_peak_mem", eq[mem_key] / peer[mem_key], "<=1.0", "x")


def flatten(name: str, line: str) -> None:
    """One JSON line per figure of a benchmark's --json line."""
    obj = json.loads(line)
    for fig, f in obj["figures"].items():
        print(json.dumps({"check": name, "benchmark": obj["benchmark"], "figure": fig, **f}), flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny random models, 3 steps (mechanics only)")
    p.add_argument("--steps", type=positive_int,
                   help="optimizer steps per training (default 30, 10 with --quick, 3 with --dry-run)")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="the device's peak (989: H200 bf16)")
    p.add_argument("--flatten", metavar="NAME", help="read a benchmark's --json line on stdin, print one per figure")
    args = p.parse_args(argv)
    if args.flatten:
        flatten(args.flatten, sys.stdin.read().strip().splitlines()[-1])
        return {}
    gpu = not args.dry_run
    if gpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device is visible: run on a GPU machine, or pass --dry-run on CPU")
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="rlora-gpu-check-") as tmp:
        work = Path(tmp)
        if args.dry_run:
            steps = args.steps or 3
            embedded = str(random_model(work / "tiny-llama-like", "tiny")[0])
            big = str(random_model(work / "tiny-qwen", "tiny", seed=1)[0])
            common = dict(steps=steps, threads=1, workers=1, use_gpu=False, bf16=True, rows_per_task=20)
            sizes = {"embedded": dict(batch=2, max_length=64), "qwen1.5b": dict(batch=2, max_length=64)}
        else:
            steps = args.steps or (10 if args.quick else 30)
            embedded = "smollm2-135m"
            big = str(random_model(work / "qwen2.5-1.5b-random", "qwen2.5-1.5b", dtype=torch.bfloat16,
                                   device="cuda")[0])
            common = dict(steps=steps, threads=4, workers=1, use_gpu=True, bf16=True, rows_per_task=200)
            sizes = {"embedded": dict(batch=16, max_length=256), "qwen1.5b": dict(batch=8, max_length=256)}
        for label, model in (("embedded", embedded), ("qwen1.5b", big)):
            kw = {**common, **sizes[label], "out": str(work / f"out-{label}")}
            check_model(label, model, kw, work, args.peak_tflops, gpu, figures)
        stop_ray()
    emit("gpu_e2e", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
