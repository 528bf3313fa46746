"""Peak memory per training process, in interleaved rounds.

Part 1 -- one process, equal work (the sides of train_throughput.py (i)): SmolLM2-135M, LoRA r=8 with
input dropout on q/v/o/down_proj, the same rows in the same order, batch 4, one thread. Each side trains
in a fresh Python process that reports its own peak resident set size (``getrusage`` ``ru_maxrss``;
``torch.cuda.max_memory_allocated`` as well on a GPU):

  rlora (train_local, LM head on every position)  /  HF Trainer + PEFT      -> rlora_vs_hf_peft_peak_rss
  rlora as shipped (LM head on the answer tail)   /  HF Trainer + PEFT      -> shipped_vs_hf_peft_peak_rss

Part 2 -- ZeRO stages with 2 Ray workers on a random-initialised model of Qwen2.5-0.5B shape (hidden 896,
intermediate 4864, 24 layers, 14 heads, 2 KV heads, tied embeddings; the vocabulary is the embedded
tokenizer's, 49,152, so 0.40 B parameters). Each worker runs the product's training loop, then records the
bytes held by its parameters (its ZeRO-3 partition where partitioned), gradients and optimizer state (each
storage counted once) and its peak RSS. The figure per stage is the largest worker's:

  ZeRO-3 / ZeRO-0 model memory (parameters + gradients + optimizer)          -> zero3_vs_zero0_model_memory
  ZeRO-2 / ZeRO-0 (the base is frozen: only the adapter's state is sharded)  -> zero2_vs_zero0_model_memory
  peak RSS of a worker, ZeRO-3 / ZeRO-0 and ZeRO-2 / ZeRO-0                  -> zero{3,2}_vs_zero0_peak_rss

Every ratio is formed within a round (the sides of a round run back to back, in rotating order); figures
are the median of the rounds ± half their range.

    python benchmarks/memory.py [--quick] [--json] [--rounds R] [--steps N] [--shape qwen2.5-0.5b|tiny]
                                [--model-dir DIR] [--no-process] [--no-zero]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, meets, parser, positive_int, ratios, show  # noqa: E402
from _e2e import (QWEN_SHAPES, SIDES, gib, random_model, run_config, run_ray_measured, run_side,  # noqa: E402
                  stop_ray)


def process_part(rounds: int, steps: int, threads: int, model: str, stage: int, figures: dict) -> None:
    rss: dict[str, list[float]] = {s: [] for s in SIDES}
    for k in range(rounds):
        for side in SIDES[k % 3:] + SIDES[:k % 3]:
            rss[side].append(run_side(side, steps, threads=threads, model=model, stage=stage)["peak_rss_bytes"])
        print(f"round {k + 1}/{rounds} peak RSS GiB: " + "  ".join(f"{s} {gib(rss[s][-1]):.3f}" for s in SIDES),
              flush=True)
    full, shipped = ratios(rss["full"], rss["peer"]), ratios(rss["answer"], rss["peer"])
    print(f"one training process, {steps} steps x batch 4, {threads} thread(s), rlora ZeRO-{stage}; peak RSS:")
    print(f"  rlora, full LM head (equal work)      {show([gib(v) for v in rss['full']], '.3f', ' GiB')}")
    print(f"  HF Trainer + PEFT LoRA                {show([gib(v) for v in rss['peer']], '.3f', ' GiB')}")
    print(f"  rlora as shipped (answer-only head)   {show([gib(v) for v in rss['answer']], '.3f', ' GiB')}")
    print(f"  rlora / HF+PEFT at equal work         {show(full)}   (target <= 1.0)")
    print(f"  rlora as shipped / HF+PEFT            {show(shipped)}   (info)")
    figures["rlora_vs_hf_peft_peak_rss"] = figure(full, "<=1.0")
    figures["shipped_vs_hf_peft_peak_rss"] = figure(shipped, "info")
    for s, name in (("full", "rlora_full_head"), ("peer", "hf_peft"), ("answer", "rlora")):
        figures[f"{name}_peak_rss_gib"] = figure([gib(v) for v in rss[s]], "info", "GiB")


def zero_part(rounds: int, steps: int, shape: str, model_dir: Path, figures: dict) -> None:
    folder, n_params = random_model(model_dir, shape)
    stages = (0, 2, 3)
    held: dict[int, list[float]] = {s: [] for s in stages}
    peak: dict[int, list[float]] = {s: [] for s in stages}
    with tempfile.TemporaryDirectory() as out:
        for k in range(rounds):
            for stage in stages[k % 3:] + stages[:k % 3]:
                cfg = run_config(steps, out, stage=stage, threads=1, model=str(folder), workers=2, batch=2,
                                 max_length=64, rows_per_task=40)
                recs = run_ray_measured(cfg, Path(out) / f"round{k}-zero{stage}")
                held[stage].append(max(r["params"] + r["grads"] + r["optimizer"] for r in recs))
                peak[stage].append(max(r["peak_rss_bytes"] for r in recs))
                parts = ", ".join(f"rank {r['rank']}: params {gib(r['params']):.3f} grads {gib(r['grads']):.4f} "
                                  f"optimizer {gib(r['optimizer']):.4f} peak RSS {gib(r['peak_rss_bytes']):.3f}"
                                  for r in recs)
                print(f"round {k + 1}/{rounds} ZeRO-{stage} GiB: {parts}", flush=True)
    stop_ray()
    print(f"2 Ray workers, random-initialised {shape} shape ({n_params / 1e9:.2f} B parameters, fp32), {steps} "
          f"steps x batch 2 per worker; per worker (the larger of the two):")
    for s in stages:
        print(f"  ZeRO-{s}: parameters + gradients + optimizer {show([gib(v) for v in held[s]], '.3f', ' GiB')}   "
              f"peak RSS {show([gib(v) for v in peak[s]], '.3f', ' GiB')}")
    z3, z2 = ratios(held[3], held[0]), ratios(held[2], held[0])
    p3, p2 = ratios(peak[3], peak[0]), ratios(peak[2], peak[0])
    print(f"  ZeRO-3 / ZeRO-0 model memory {show(z3)} (target <= 0.6); ZeRO-2 / ZeRO-0 {show(z2)} (info)")
    print(f"  ZeRO-3 / ZeRO-0 peak RSS     {show(p3)} (info);            ZeRO-2 / ZeRO-0 {show(p2)} (info)")
    figures["zero3_vs_zero0_model_memory"] = figure(z3, "<=0.6")
    figures["zero2_vs_zero0_model_memory"] = figure(z2, "info")
    figures["zero3_vs_zero0_peak_rss"] = figure(p3, "info")
    figures["zero2_vs_zero0_peak_rss"] = figure(p2, "info")
    for s in stages:
        figures[f"zero{s}_model_memory_gib"] = figure([gib(v) for v in held[s]], "info", "GiB")
        figures[f"zero{s}_peak_rss_gib"] = figure([gib(v) for v in peak[s]], "info", "GiB")


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=positive_int, help="interleaved rounds (default 2)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps per training (default 4; 2 with --quick)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads of part 1 (default 1)")
    p.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage of rlora in part 1 (2)")
    p.add_argument("--model", default="smollm2-135m", help="part 1's model (default smollm2-135m)")
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(QWEN_SHAPES), help="part 2's model shape")
    p.add_argument("--model-dir", type=Path, help="where part 2's random model is written (reused when there)")
    p.add_argument("--no-process", action="store_true", help="leave out part 1")
    p.add_argument("--no-zero", action="store_true", help="leave out part 2 (the Ray workers)")
    args = p.parse_args(argv)
    steps = args.steps or (2 if args.quick else 4)
    rounds = args.rounds or 2
    figures: dict = {}
    if not args.no_process:
        process_part(rounds, steps, args.threads, args.model, args.stage, figures)
    if not args.no_zero:
        if args.model_dir is not None:
            zero_part(rounds, steps, args.shape, args.model_dir, figures)
        else:
            with tempfile.TemporaryDirectory(prefix="rlora-random-model-") as d:
                zero_part(rounds, steps, args.shape, Path(d), figures)
    for name, f in figures.items():
        ok = meets(f["value"], f["target"])
        if ok is not None:
            print(f"  target {name} {f['target']}: {'holds' if ok else 'MISSED'}")
    emit("memory", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
