"""Rebuild a stored comparison's report from its committed cell records, training nothing.

A cell's key is a hash of its config, so cells recorded by an older version of the code (config fields
added since) are not found by a re-run of ``rlora compare``, which would train them again. Their records
(per-row scores, seeds, wall time) are all a report needs: this reads ``CELLS/*.json`` and writes
``PREFIX.md``, ``PREFIX.json`` and ``PREFIX_forest.png`` with the current statistics (the same
summary, tables and plot as ``rlora compare``):

    python benchmarks/rereport.py benchmarks/results/compare_cpu_cells benchmarks/results/compare_cpu
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    from rlora.compare import forest_plot, markdown_table, to_json
    from rlora.compare.runner import report_summary

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cells", type=Path, help="folder of cell records (*.json)")
    p.add_argument("prefix", type=Path, help="report path without suffix, e.g. benchmarks/results/compare_cpu")
    p.add_argument("--baseline", default="lora", help="baseline method (default lora)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=42, help="the bootstrap's seed (rlora compare: trainer.seed; 42)")
    p.add_argument("--methods", default="lora,hydra,rlora,mtl,align", help="method order in the report")
    p.add_argument("--samplers", default="proportional,dynamic", help="sampler order in the report")
    p.add_argument("--budget", default="ab", help="the budget mode the cells were trained with (default ab)")
    args = p.parse_args(argv)
    files = sorted(args.cells.glob("*.json"))
    if not files:
        raise SystemExit(f"error: no cell records (*.json) in {args.cells}: give the folder of a comparison's cells")
    methods, samplers = args.methods.split(","), args.samplers.split(",")
    records = [json.loads(f.read_text()) for f in files]
    unknown = sorted({r["method"] for r in records} - set(methods)) + sorted({r["sampler"] for r in records} - set(samplers))
    if unknown:
        raise SystemExit(f"error: cells of {unknown} in {args.cells}: add them to --methods / --samplers")
    # plan order, as rlora compare writes its report: samplers outer, methods inner, then seeds
    records.sort(key=lambda r: (samplers.index(r["sampler"]), methods.index(r["method"]), r["seed"]))
    present = [s for s in samplers if any(r["sampler"] == s for r in records)]
    summary = report_summary(records, args.baseline, present, args.n_boot, args.seed, args.budget)
    table = markdown_table(summary)
    args.prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.prefix}.md").write_text(table + "\n")
    Path(f"{args.prefix}.json").write_text(json.dumps(to_json(summary), indent=1) + "\n")
    if summary["comparisons"]:
        forest_plot(summary, Path(f"{args.prefix}_forest.png"))
    print(table, flush=True)
    return summary


if __name__ == "__main__":
    main()
