"""Quality of the adapter methods and samplers on mtl_cpu6: a thin wrapper over ``rlora compare``.

1. ``lora, hydra, rlora, mtl`` with the ``proportional`` sampler, ``--seeds`` seeds each, at equal shared
   A + B budgets (``examples/configs/compare_cpu.yaml``: SmolLM2-135M, r = 8 with N = 3 heads vs LoRA
   rank 14, q/v/o/down_proj, 200 steps of 8 rows, every dev row scored);
2. ``dynamic`` vs ``proportional`` with the method of the best mean accuracy (its proportional cells are
   the ones of step 1: a cell is trained once per config and seed).

Every difference is paired (same seeds, same data order, same dev rows) with a 95 % interval from
the paired bootstrap of seeds and dev rows of :mod:`rlora.compare`. The report (``compare_cpu.{md,json}`` and
``compare_cpu_forest.png`` in benchmarks/results, ``compare_quick.*`` with ``--quick``) and the JSON
last line carry the differences in points with their half-widths as ``spread``.

    python benchmarks/quality.py [--quick] [--json] [--seeds N] [--data DIR] [--model M] [--local]
                                 [--out DIR] [--work DIR] [k=v overrides]

``--quick``: 4 steps, 4 dev rows per task, 2 seeds, cells in this process (minutes; its accuracies
mean nothing). ``--work``: where the cells are kept (default outputs/quality[_quick]): re-running the
same command skips the cells already trained. The finished cells' records are also copied to
``compare_cpu_cells/`` beside the report; copied back into ``WORK/cells/`` on another clone or machine
they are skipped there too (a cell's key is its config and its data's contents, not their paths):

    mkdir -p outputs/quality/cells && cp benchmarks/results/compare_cpu_cells/*.json outputs/quality/cells/
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, parser  # noqa: E402

CONFIG = REPO / "examples" / "configs" / "compare_cpu.yaml"
RESULTS = REPO / "benchmarks" / "results"
METHODS = ["lora", "hydra", "rlora", "mtl"]
QUICK = ["trainer.max_steps=4", "trainer.save_steps=2", "trainer.logging_steps=2", "eval.max_examples_per_task=4",
         "sampler.dynamic_interval=2", "sampler.dynamic_window=1", "diagnostics.every_n_steps=4"]
TARGETS = {"rlora": ">=+1", "mtl": ">=+1", "hydra": "info", "dynamic": ">=+2"}


def figures(summary: dict) -> dict:
    """Each comparison's difference (points) with its interval half-width as the spread."""
    out = {}
    for c in summary["comparisons"]:
        a = c["a"]
        stat = "worst" if c["kind"] == "sampler" else "mean"
        if c["kind"] == "sampler":
            name = f"{a['sampler']}_minus_proportional_{stat}_{a['method']}"
            target = TARGETS.get(a["sampler"], "info")
        else:
            name = f"{a['method']}_minus_{c['b']['method']}_{stat}"
            target = TARGETS.get(a["method"], "info")
        r = c[stat]
        out[name] = {"value": round(100 * r["diff"], 2), "spread": round(100 * r["half_width"], 2),
                     "target": target, "unit": "points", "interval": [round(100 * r["lo"], 2), round(100 * r["hi"], 2)],
                     "verdict": r["verdict"]}
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    from rlora.compare.runner import Comparison
    from rlora.config import load_config

    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; --quick 2)")
    ap.add_argument("--data", help="task directory (default ../shared/data/mtl_cpu6)")
    ap.add_argument("--model", help="base model (default smollm2-135m)")
    ap.add_argument("--local", action="store_true", help="train the cells in this process (default with --quick)")
    ap.add_argument("--out", default=str(RESULTS), help="report folder (default benchmarks/results)")
    ap.add_argument("--work", help="cells folder (default outputs/quality or outputs/quality_quick)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    if args.data and not Path(args.data).is_dir():
        raise SystemExit(f"error: --data {args.data} is not a directory: give a folder with one sub-folder per task")
    over = list(QUICK if args.quick else []) + list(args.overrides)
    over += [f"data.path={Path(args.data).resolve()}"] if args.data else []
    over += [f"model.name_or_path={args.model}"] if args.model else []
    cfg = load_config(CONFIG, over)
    tag = "compare_quick" if args.quick else "compare_cpu"
    work = Path(args.work or REPO / "outputs" / ("quality_quick" if args.quick else "quality"))
    seeds = args.seeds or (2 if args.quick else 3)
    local = args.local or args.quick

    first = Comparison(cfg, [(m, "proportional") for m in METHODS], seeds, "lora", "ab", work, local=local).run()
    best = max(first["arms"], key=lambda a: a["mean"])["method"]
    print(f"[quality] best method by mean accuracy: {best}; now dynamic vs proportional with it", flush=True)
    arms = [(m, "proportional") for m in METHODS] + [(best, "dynamic")]
    summary = Comparison(cfg, arms, seeds, "lora", "ab", work, local=local).run()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for src, dst in (("compare.md", f"{tag}.md"), ("compare.json", f"{tag}.json"), ("forest.png", f"{tag}_forest.png")):
        shutil.copyfile(work / src, out / dst)
    (out / f"{tag}_cells").mkdir(exist_ok=True)  # the cells' records: copied into a --work folder, they resume
    for f in (work / "cells").glob("*.json"):
        shutil.copyfile(f, out / f"{tag}_cells" / f.name)
    emit("quality", figures(summary), args.json)
    return summary


if __name__ == "__main__":
    main()
