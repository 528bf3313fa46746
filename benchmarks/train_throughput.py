"""End-to-end training throughput at equal work, in interleaved rounds on one machine.

Every side trains SmolLM2-135M with the same method -- LoRA r=8, alpha 16, input dropout 0.05 (PEFT's
placement) on q/v/o/down_proj -- on the same rows in the same order (the shipped demo tasks as rlora's
proportional sampler draws them; the peer gets exactly those rows through a SequentialSampler, no
shuffling), batch 4, the same optimizer settings and the same number of torch threads. Tokens/s counts the
non-padding tokens of every step after the first, over the time from the end of step 1 to the end of the
last step, on every side.

  (i)   rlora (``rlora.train.local.train_local``, the product's loop, DeepSpeed ZeRO-``--stage``, world
        size 1) with the LM head on *every* position, as the peer computes it
        vs  Hugging Face Trainer + PEFT LoRA                                     -> rlora_vs_hf_peft_equal_work
  (ii)  rlora as shipped (LM head only on the answer tail) / rlora with the full LM head
                                                                                 -> answer_only_lm_head_gain
  (iii) the same run as shipped on Ray Train + DeepSpeed, 1 worker / in process  -> ray_vs_in_process
        (+ time to first step inside the Ray worker: model load, tokenisation, engine set-up)

What still differs in (i): rlora's loss sends only the answer positions through the softmax, HF's loss all
positions; rlora steps through the DeepSpeed engine, HF through torch AdamW; rlora left-pads, HF right-pads.
Every side trains in a fresh Python process (nothing shared: threads, process group, allocator); a round
runs (i)-(ii)'s three sides in a rotating order, then (iii)'s Ray run; every figure is the median of the
per-round ratios, ± half their range.

    python benchmarks/train_throughput.py [--quick] [--json] [--steps N] [--stage S] [--rounds R] [--threads T]
    python benchmarks/train_throughput.py --steps 16 --stage 0        # ZeRO-0 for both rlora sides and Ray
    python benchmarks/train_throughput.py --quick --no-ray            # (i) and (ii) only
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, meets, parser, positive_int, ratios, show  # noqa: E402
from _e2e import env_threads, fresh_run_name, run_config, run_side, stop_ray  # noqa: E402


def run_ray(cfg) -> dict:
    from rlora.train.launcher import run_training

    s = run_training(fresh_run_name(cfg)).summary
    return {"tokens_per_s": s["train_tokens_per_s"], "first_step_s": s["time_to_first_step_s"]}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=positive_int, help="optimizer steps per run (default 8 with --quick, else 16)")
    p.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=2, help="DeepSpeed ZeRO stage of rlora (2)")
    p.add_argument("--rounds", type=positive_int, help="interleaved rounds (default 2 with --quick, else 3)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads on every side (default 1)")
    p.add_argument("--no-ray", action="store_true", help="leave out (iii), the Ray Train run")
    p.add_argument("--model", default="smollm2-135m", help="model name or local folder (default smollm2-135m)")
    args = p.parse_args(argv)
    steps = args.steps or (8 if args.quick else 16)
    if steps < 2:
        p.error("--steps must be >= 2: tokens/s is measured over the steps after the first")
    rounds = args.rounds or (2 if args.quick else 3)
    env_threads(args.threads)

    tps: dict[str, list[float]] = {"full": [], "peer": [], "answer": [], "ray": []}
    first_ray: list[float] = []
    same_rows = True
    threads_seen: set[int] = set()
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(steps, out, stage=args.stage, threads=args.threads, model=args.model)
        sides = ["full", "peer", "answer"]
        for k in range(rounds):
            got = {}
            for side in sides[k % 3:] + sides[:k % 3]:
                got[side] = run_side(side, steps, threads=args.threads, model=args.model, stage=args.stage)
                tps[side].append(got[side]["tokens_per_s"])
                threads_seen.add(got[side]["threads"])
            same_rows &= got["full"]["rows_sha1"] == got["peer"]["rows_sha1"] == got["answer"]["rows_sha1"]
            same_rows &= got["full"]["steps_seen"] == steps
            line = "  ".join(f"{s} {got[s]['tokens_per_s']:7.1f}" for s in sides)
            if not args.no_ray:
                r = run_ray(cfg)
                tps["ray"].append(r["tokens_per_s"])
                first_ray.append(r["first_step_s"])
                line += f"  ray {r['tokens_per_s']:7.1f} (first step {r['first_step_s']:.1f}s)"
            print(f"round {k + 1}/{rounds} tok/s: {line}", flush=True)

    stop_ray()
    full_vs_peer = ratios(tps["full"], tps["peer"])
    answer_gain = ratios(tps["answer"], tps["full"])
    print(f"SmolLM2-135M, LoRA r=8 input dropout on {len(cfg.adapter.target_modules)} targets, {steps} steps x batch "
          f"4, demo data in rlora's sampler order on every side, {args.threads} thread(s), rlora ZeRO-{args.stage}; "
          f"median ± half-range of {rounds} interleaved rounds")
    print(f"  same rows in the same order on every side: {'yes' if same_rows else 'NO'}; torch threads at the end "
          f"of every side: {sorted(threads_seen)}")
    print(f"  rlora, full LM head (equal work)   {show(tps['full'], '.1f', ' tok/s')}")
    print(f"  HF Trainer + PEFT LoRA             {show(tps['peer'], '.1f', ' tok/s')}")
    print(f"  rlora as shipped (answer-only head) {show(tps['answer'], '.1f', ' tok/s')}")
    print(f"  (i)   rlora / HF+PEFT at equal work         {show(full_vs_peer)}   (target >= 1.0)")
    print(f"  (ii)  answer-only LM head / full LM head    {show(answer_gain)}   (info)")
    figures = {
        "rlora_vs_hf_peft_equal_work": figure(full_vs_peer, ">=1.0"),
        "answer_only_lm_head_gain": figure(answer_gain, "info"),
        "same_rows_same_order": figure(float(same_rows), "==1", "bool", spread=0.0),
        "rlora_full_head_tokens_per_s": figure(tps["full"], "info", "tok/s"),
        "hf_peft_tokens_per_s": figure(tps["peer"], "info", "tok/s"),
        "rlora_tokens_per_s": figure(tps["answer"], "info", "tok/s"),
    }
    if not args.no_ray:
        ray_vs = ratios(tps["ray"], tps["answer"])
        print(f"  rlora on Ray Train, 1 worker        {show(tps['ray'], '.1f', ' tok/s')}")
        print(f"  (iii) Ray Train + DeepSpeed / in process    {show(ray_vs)}   (target >= 0.9)")
        print(f"  time to first step in the Ray worker        {show(first_ray, '.1f', ' s')}   (target <= 20 s)")
        figures["ray_vs_in_process"] = figure(ray_vs, ">=0.9")
        figures["time_to_first_step"] = figure(first_ray, "<=20", "s")
        figures["ray_tokens_per_s"] = figure(tps["ray"], "info", "tok/s")
    for name, f in figures.items():
        ok = meets(f["value"], f["target"])
        if ok is not None:
            print(f"  target {name} {f['target']}: {'holds' if ok else 'MISSED'}")
    emit("train_throughput", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
