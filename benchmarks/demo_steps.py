"""Is the main job's before/after table as good with fewer steps? `make run`'s config at several step
counts and seeds, compared with paired intervals.

Every cell is the main job itself -- ``examples/configs/cpu_demo.yaml`` with ``trainer.max_steps=S``
and ``trainer.seed=X`` through the product's launcher (2 Ray workers, ZeRO-2, all 6 x 60 dev rows) --
and its record (per-row correctness) is kept in ``--out``/cells/steps<S>-seed<X>.json, so a re-run
only trains the missing cells. Every shorter step count is compared with the longest on the same
seeds: the difference in mean and worst-task dev accuracy with a 95 % paired bootstrap
interval (seeds and dev rows, crossed: :func:`rlora.compare.stats.paired_differences`).

    python benchmarks/demo_steps.py --steps 60,40 --seeds 42,43,44 [--json]   # the README's result
    python benchmarks/demo_steps.py --quick     # 4 vs 2 steps, 1 seed, 4 dev rows a task: mechanics only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, parser  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "configs" / "cpu_demo.yaml"


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def train_cell(steps: int, seed: int, out: Path, extra: list[str], local: bool = False) -> dict:
    """One run of the main job's config through the product's launcher (``local``: in this process, no
    Ray); its record for the bootstrap."""
    from rlora.config import load_config
    from rlora.train.launcher import run_training

    overrides = [f"trainer.max_steps={steps}", f"trainer.seed={seed}", f"trainer.output_dir={out / 'runs'}",
                 f"trainer.run_name=demo-steps{steps}-seed{seed}-{uuid.uuid4().hex[:6]}", *extra]
    t0 = time.perf_counter()
    summary = run_training(load_config(CONFIG, overrides), local=local, verbose=False).summary
    after = summary["results_after"]
    return {"method": f"steps{steps}", "sampler": "temperature", "seed": seed, "steps": steps,
            "wall_s": time.perf_counter() - t0, "settings": extra, "overrides": overrides,
            "correct": {t: r["row_correct"] for t, r in after.items()},
            "row_ids": {t: r["row_ids"] for t, r in after.items()},
            "accuracy": {t: r["accuracy"] for t, r in after.items()},
            "accuracy_before": {t: r["accuracy"] for t, r in (summary.get("results_before") or {}).items()}}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int_list, help="step counts; the longest is the reference (default 60,40)")
    p.add_argument("--seeds", type=int_list, help="trainer.seed of each cell (default 42,43,44)")
    p.add_argument("--out", type=Path, help="cells and runs folder (default outputs/demo_steps, --quick: "
                                            "outputs/demo_steps_quick)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--local", action="store_true", help="train the cells in this process instead of on Ray")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every cell (e.g. eval.max_examples_per_task=20)")
    args = p.parse_args(argv)
    steps = sorted(args.steps or ([4, 2] if args.quick else [60, 40]), reverse=True)
    seeds = args.seeds or ([42] if args.quick else [42, 43, 44])
    extra = (["eval.max_examples_per_task=4", "diagnostics.enabled=false"] if args.quick else []) + args.overrides
    out = args.out or ROOT / "outputs" / ("demo_steps_quick" if args.quick else "demo_steps")
    (out / "cells").mkdir(parents=True, exist_ok=True)

    cells: dict[tuple[int, int], dict] = {}
    for s in steps:
        for seed in seeds:
            path = out / "cells" / f"steps{s}-seed{seed}.json"
            if not path.exists():
                record = train_cell(s, seed, out, extra, args.local)
                path.write_text(json.dumps(record, indent=1))
            cells[s, seed] = json.loads(path.read_text())
            if cells[s, seed].get("settings") != extra:
                raise SystemExit(f"{path} was trained with overrides {cells[s, seed].get('settings')}, not {extra}: "
                                 "use another --out for other settings")

    from rlora.compare.stats import paired_differences

    ref = steps[0]
    figures: dict = {}
    print(f"main job (cpu_demo.yaml) at {steps} steps, seeds {seeds}; differences vs {ref} steps, 95 % paired "
          "bootstrap over seeds and dev rows")
    for s in steps:
        mean = [100 * sum(c["accuracy"].values()) / len(c["accuracy"]) for c in (cells[s, x] for x in seeds)]
        wall = [cells[s, x]["wall_s"] / 60 for x in seeds]
        print(f"  {s:4d} steps: mean dev accuracy {', '.join(f'{m:.1f}' for m in mean)} (seeds {seeds}); "
              f"wall {', '.join(f'{w:.1f}' for w in wall)} min")
        if s == ref:
            continue
        d = paired_differences([cells[s, x] for x in seeds], [cells[ref, x] for x in seeds],
                               statistics=["mean", "worst"], n_boot=args.n_boot)["results"]
        for stat in ("mean", "worst"):
            r = d[stat]
            print(f"    {stat:5s} {100 * r['a']:.1f} vs {100 * r['b']:.1f}: {100 * r['diff']:+.1f} "
                  f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] ({r['verdict']})")
            figures[f"steps{s}_minus_steps{ref}_{stat}_accuracy"] = {
                **figure(100 * r["diff"], "info", unit="pt", spread=None),
                "lo": round(100 * r["lo"], 4), "hi": round(100 * r["hi"], 4), "seeds": seeds}
    emit("demo_steps", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
