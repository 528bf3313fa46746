"""The quality suite: which method beats tuned plain LoRA, on three disjoint multi-task sets. A thin wrapper
over ``rlora compare`` (:class:`rlora.compare.suite.Suite`), with the suite's settings fixed:

* methods ``lora, mtl, rlora, align`` (proportional sampler), equal shared A + B budgets
  (``examples/configs/compare_cpu.yaml``: SmolLM2-135M, multi-head r = 8, N = 3 vs LoRA rank 14, 200 steps);
* sets ``mtl_cpu6, bigbench_default, mtl_gpu12_rest`` (the last built at run time from ``../shared/data``);
* per arm and set, the learning rate picked from 3e-4, 1e-3, 3e-3, 1e-2 on 100 validation rows a task carved
  from the training rows (one tuning cell each, trained the verdict's 200 steps, seed ``trainer.seed + 1000``;
  1e-2 was added after the first set's picks were 3e-3, the top of the range then, for 3 of 4 methods);
* 2 seeds per verdict cell, 150 dev rows a task scored; each set reported, then pooled (stratified
  bootstrap of seeds and dev rows, crossed).

It trains the same cells (same keys, same folders) as, per set, ``rlora compare examples/configs/compare_cpu.yaml
--local --methods lora,mtl,rlora,align --seeds 2 --sets SET --tune trainer.learning_rate=3e-4,1e-3,3e-3,1e-2
--tune-steps 200 --out outputs/suite eval.max_examples_per_task=150`` run from the repository root.

The grid is long on two cores (a cell 7.5-13.5 min by the set's row lengths: 16 tuning + 8 verdict cells, 3-5 h a
set, ~12 h in all),
so it runs in pieces: ``--sets`` trains only those sets' cells; every finished cell's record is copied to
``benchmarks/results/suite_cells/`` (the work folder's layout; also when the run fails or is stopped) and copied
back into the work folder before anything trains, so a fresh clone skips every committed cell (a cell's key is
its config and its data's contents). Each set's report is written as the set finishes (``suite_<set>.md``,
``suite_<set>.json``, ``suite_forest_<set>.png``); when all three sets are done, the suite's: ``suite.md``,
``suite.json`` (with the settings and the cell time), ``suite_forest_<set>.png`` and ``suite_forest_pooled.png``
in benchmarks/results (``suite_quick.*`` with ``--quick``).

    python benchmarks/suite.py [--quick] [--json] [--sets S,S] [--seeds N] [--work DIR] [--sync] [k=v overrides]

``--sync``: train nothing; copy the finished cells of the work folder to the results folder (a run of this
script or of the equivalent ``rlora compare`` command in progress keeps going) and print the progress.
``--rank-check [--rank-steps N] [--rank-values V,V]``: would tuning at N (default 100) steps pick what the
suite's 200-step tuning picks? Trains the ``--sets``' tuning cells of those values again at N steps in
``<set>/tune_<N>/`` (the suite's own ones too, where missing) and writes ``suite_rank_check.{md,json}``: per set
and method, both scores per value, both picks, whether they agree. (On ``bigbench_default`` 100 steps did not
always pick what 200 picked, so the suite tunes at 200.)
``--quick``: 2 steps, 4 dev and 4 validation rows a task, two methods and two learning rates (minutes; its
accuracies mean nothing).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, parser, positive_int  # noqa: E402

CONFIG = REPO / "examples" / "configs" / "compare_cpu.yaml"
RESULTS = REPO / "benchmarks" / "results"
SETS = ["mtl_cpu6", "bigbench_default", "mtl_gpu12_rest"]
FULL = {"methods": ["lora", "mtl", "rlora", "align"], "tune": ["trainer.learning_rate=3e-4,1e-3,3e-3,1e-2"],
        "tune_steps": 200, "val_rows": 100, "seeds": 2, "overrides": ["eval.max_examples_per_task=150"]}
QUICK = {"methods": ["lora", "align"], "tune": ["trainer.learning_rate=1e-3,3e-3"], "tune_steps": 2, "val_rows": 4,
         "seeds": 2, "overrides": ["trainer.max_steps=2", "trainer.save_steps=2", "trainer.logging_steps=1",
                                   "eval.max_examples_per_task=4", "diagnostics.every_n_steps=2"]}


def cell_files(root: Path) -> list[Path]:
    """Every finished cell's record under ``root`` (verdict cells ``<set>/cells``, tuning cells
    ``<set>/tune/<value>/cells``), relative to ``root``."""
    return sorted(p.relative_to(root) for p in root.glob("**/cells/*.json") if p.is_file())


def copy_cells(src: Path, dst: Path) -> int:
    """Copy the cell records of ``src`` that ``dst`` lacks (same relative paths; each written to a temporary
    name and renamed, so an interrupted copy leaves no partial record); returns how many."""
    n = 0
    for rel in cell_files(src) if src.is_dir() else []:
        if not (dst / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            tmp = (dst / rel).with_name(f".{rel.name}.tmp-{os.getpid()}")
            shutil.copyfile(src / rel, tmp)
            os.replace(tmp, dst / rel)
            n += 1
    return n


def progress(work: Path, sets: list[str], spec: dict) -> dict:
    """Per set: tuning and verdict cells of the suite's methods finished (of how many planned), each method's
    pick once its tuning cells are all in (the highest validation macro mean, a tie to the value listed first,
    as in :func:`rlora.compare.tune.pick`), and the wall time of those cells in hours. A verdict cell counts
    once per (method, seed) of the planned seeds, and only when trained with its method's pick (a cell of a
    superseded pick, or of a method still tuning, is not counted)."""
    from rlora.compare.suite import tuning_seed
    from rlora.compare.tune import candidates, folder_name, label, pick

    key, text = spec["tune"][0].split("=", 1)
    cands = candidates([(key, text.split(","))])
    seeds = set(range(spec["seed"], spec["seed"] + spec["seeds"]))
    seed = tuning_seed(spec["seed"], spec["seeds"])
    out = {}
    for name in sets:
        folder = work / name
        recs = {rel: json.loads((folder / rel).read_text()) for rel in cell_files(folder)} if folder.is_dir() else {}
        mine = {rel: r for rel, r in recs.items() if r["method"] in spec["methods"]}
        tune = [rel for rel in mine if rel.parts[0] == "tune" and mine[rel]["seed"] == seed]
        picks = {}
        for m in spec["methods"]:
            scores = {label(c): mine[rel]["accuracy"] for c in cands for rel in tune
                      if rel.parts[1] == folder_name(c) and mine[rel]["method"] == m}
            if len(scores) == len(cands):
                picks[m] = pick({lb: sum(acc.values()) / len(acc) for lb, acc in scores.items()})
        verdict = {(r["method"], r["seed"]): rel for rel, r in mine.items() if rel.parts[0] != "tune"
                   and r["seed"] in seeds and r["method"] in picks and label(r["overrides"]) == picks[r["method"]]}
        hours = sum(mine[rel]["wall_s"] for rel in [*tune, *verdict.values()]) / 3600
        out[name] = {"tuning_cells": f"{len(tune)}/{len(spec['methods']) * len(cands)}",
                     "picks": {m: lb.split("=", 1)[1] for m, lb in picks.items()},
                     "verdict_cells": f"{len(verdict)}/{len(spec['methods']) * spec['seeds']}",
                     "cell_hours": round(hours, 2)}
    return out


def figures(result: dict, pooled_too: bool = True) -> dict:
    """Each method minus LoRA per set (from the set's own report) and pooled (points), its interval half-width
    as the spread; without ``pooled_too`` (a run of some of the sets) the per-set figures only."""
    def figure(r: dict) -> dict:
        return {"value": round(100 * r["diff"], 2), "spread": round(100 * r["half_width"], 2), "target": "info",
                "unit": "points", "interval": [round(100 * r["lo"], 2), round(100 * r["hi"], 2)],
                "verdict": r["verdict"]}
    out = {}
    for name, summary in (result.get("sets") or {}).items():
        for c in summary["comparisons"]:
            out[f"{c['a']['method']}_minus_lora_{name}"] = figure(c["mean"])
    if pooled_too:
        for c in (result.get("pooled") or {}).get("comparisons", []):
            out[f"{c['a']['method']}_minus_lora_pooled"] = figure(c["pooled"])
    return out


def write_set(work: Path, out: Path, tag: str, name: str) -> None:
    """One finished set's report as it lands (before the other sets): ``<tag>_<set>.md``, ``<tag>_<set>.json``
    and ``<tag>_forest_<set>.png``, copies of the set's ``compare.md``, ``compare.json`` and ``forest.png``."""
    for src, dst in (("compare.md", f"{tag}_{name}.md"), ("compare.json", f"{tag}_{name}.json"),
                     ("forest.png", f"{tag}_forest_{name}.png")):
        shutil.copyfile(work / name / src, out / dst)


def write_report(work: Path, out: Path, tag: str, spec: dict, wall: dict) -> None:
    """``<tag>.md`` (the settings, each set's report, then the pooled one), ``<tag>.json`` and the forest plots."""
    parts = [f"# Quality suite: {', '.join(SETS)}\n\n",
             f"Settings: methods {', '.join(spec['methods'])}; tuning {'; '.join(spec['tune'])} "
             f"({spec['tune_steps']} steps, {spec['val_rows']} validation rows a task); {spec['seeds']} seeds; "
             f"overrides {' '.join(spec['overrides']) or 'none'}.\n\n",
             "Cell time (hours, tuning and verdict cells): "
             + ", ".join(f"{s} {w['cell_hours']}" for s, w in wall.items()) + "\n"]
    for s in SETS:
        parts += [f"\n## {s}\n\n", (work / s / "compare.md").read_text()]
        shutil.copyfile(work / s / "forest.png", out / f"{tag}_forest_{s}.png")
    parts += ["\n## Pooled over the sets\n\n", (work / "pooled.md").read_text()]
    if (work / "forest_pooled.png").is_file():
        shutil.copyfile(work / "forest_pooled.png", out / f"{tag}_forest_pooled.png")
    (out / f"{tag}.md").write_text("".join(parts))
    record = {"settings": spec, "sets": {s: json.loads((work / s / "compare.json").read_text()) for s in SETS},
              "pooled": json.loads((work / "pooled.json").read_text()), "wall": wall}
    (out / f"{tag}.json").write_text(json.dumps(record, indent=1))


def agreement(short: dict, full: dict) -> dict:
    """One arm's tuning at fewer steps (``short``) against the suite's tuning (``full``), both
    :func:`~rlora.compare.tune.tune_arms` entries: the scores of the candidates both trained, each side's pick
    among them (a tie to the one listed first, as in tuning), whether the picks agree and whether the candidates
    rank in the same order."""
    labels = [lb for lb in full["scores"] if lb in short["scores"]]
    s = {lb: short["scores"][lb] for lb in labels}
    f = {lb: full["scores"][lb] for lb in labels}

    def order(scores: dict) -> list[str]:
        return sorted(labels, key=lambda lb: (-scores[lb], labels.index(lb)))

    return {"method": full["method"], "scores_short": s, "scores_full": f, "pick_short": order(s)[0],
            "pick_full": order(f)[0], "same_pick": order(s)[0] == order(f)[0], "same_order": order(s) == order(f)}


def rank_check(cfg, spec: dict, work: Path, sets: list[str], values: Optional[list[str]], steps: int) -> dict:
    """Would tuning at ``steps`` steps pick what the suite's tuning (at the verdict's steps) picks? Per set and
    method, the tuning cells of ``values`` of the tuned key (default all) are trained at ``steps`` steps (same
    seed, carved rows, validation rows) in ``<work>/<set>/tune_<steps>/``, beside the suite's own tuning cells
    (``<work>/<set>/tune/``, trained where missing), and both sides' picks among those values are compared
    (:func:`agreement`). Returns ``{set: [agreement per method]}``."""
    from rlora.compare.suite import Suite
    from rlora.compare.tune import parse_tune
    from rlora.config import ConfigError

    try:
        tune = parse_tune(spec["tune"], cfg)
        key = tune[0][0]
        if values and not set(values) <= set(tune[0][1]):
            raise ConfigError(f"--rank-values {','.join(values)}: use values the suite tunes, {','.join(tune[0][1])}")
        # in the suite's order, so a tie goes to the same value as in the suite's tuning
        checked = [(key, [v for v in tune[0][1] if not values or v in values])]
        arms = [(m, "proportional") for m in spec["methods"]]
        suite = Suite(cfg, arms, spec["seeds"], "lora", "ab", work, sets=sets, tune=tune,
                      tune_steps=spec["tune_steps"], val_rows=spec["val_rows"], local=True)
        out = {}
        for name, folder in suite.folders().items():
            _, tcfg = suite.tuning_configs(name, folder)
            full = suite.tuned(name, tcfg, checked, spec["tune_steps"], "tune")
            short = suite.tuned(name, tcfg, checked, steps, f"tune_{steps}")
            out[name] = [agreement(a, b) for a, b in zip(short, full)]
        return out
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def write_rank_check(result: dict, short: int, full: int, val_rows: int, out: Path, tag: str) -> dict:
    """``<tag>_rank_check.{md,json}``; returns the figures (picks and orders that agree, of how many)."""
    labels = list(next(iter(result.values()))[0]["scores_full"])
    lines = [f"# Tuning at {short} steps against the suite's tuning at {full} steps\n\n",
             f"Validation macro mean (%) per candidate, one tuning cell each (seed trainer.seed + 1000, "
             f"{val_rows} validation rows a task carved from the training rows); each side's pick among the "
             f"checked values. The suite tunes at {full} steps, the steps of its verdict cells.\n\n",
             "| set | method | " + " | ".join(f"{lb.split('=', 1)[1]} @{short} / @{full}" for lb in labels)
             + f" | pick @{short} | pick @{full} | same pick | same order |\n",
             "|---|---|" + "---|" * (len(labels) + 4) + "\n"]
    for name, rows in result.items():
        for r in rows:
            cells = " | ".join(f"{100 * r['scores_short'][lb]:.1f} / {100 * r['scores_full'][lb]:.1f}"
                               for lb in r["scores_full"])
            lines.append(f"| {name} | {r['method']} | {cells} | {r['pick_short'].split('=', 1)[1]} | "
                         f"{r['pick_full'].split('=', 1)[1]} | {'yes' if r['same_pick'] else 'NO'} | "
                         f"{'yes' if r['same_order'] else 'no'} |\n")
    rows = [r for rs in result.values() for r in rs]
    n_pick, n_order = sum(r["same_pick"] for r in rows), sum(r["same_order"] for r in rows)
    lines.append(f"\nSame pick: {n_pick} of {len(rows)}; same order: {n_order} of {len(rows)}.\n")
    (out / f"{tag}_rank_check.md").write_text("".join(lines))
    (out / f"{tag}_rank_check.json").write_text(json.dumps({"short_steps": short, "full_steps": full,
                                                            "sets": result}, indent=1))
    return {"same_pick": {"value": n_pick / len(rows), "spread": 0, "target": "info", "unit": "fraction",
                          "of": len(rows)},
            "same_order": {"value": n_order / len(rows), "spread": 0, "target": "info", "unit": "fraction",
                           "of": len(rows)}}


def arguments(argv: Optional[list[str]]):
    """The parsed command line; the suite's sets in the suite's order. (A set's bootstrap seed is
    ``trainer.seed`` + its index in :data:`SETS` whichever ``--sets`` a run trains, so its report is the same.)"""
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--sets", help=f"train only these sets' cells (default all: {','.join(SETS)})")
    ap.add_argument("--seeds", type=positive_int, help="seeds per verdict cell (default 2)")
    ap.add_argument("--work", help="work folder (default outputs/suite, outputs/suite_quick with --quick)")
    ap.add_argument("--out", default=str(RESULTS), help="report and cells folder (default benchmarks/results)")
    ap.add_argument("--sync", action="store_true", help="train nothing: copy finished cells, print progress")
    ap.add_argument("--rank-check", action="store_true",
                    help="train the tuning cells again at --rank-steps and report whether the picks agree")
    ap.add_argument("--rank-steps", type=positive_int,
                    help="with --rank-check: the steps of the cells checked against the suite's tuning (default 100)")
    ap.add_argument("--rank-values", help="with --rank-check: only these values of the tuned key (default all)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.sets.split(",") if s.strip()] if args.sets else list(SETS)
    if not names or any(s not in SETS for s in names):
        raise SystemExit(f"error: --sets {args.sets}: give a comma-separated list of the suite's sets, {','.join(SETS)}")
    args.sets = [s for s in SETS if s in names]
    for flag, value in (("--rank-values", args.rank_values), ("--rank-steps", args.rank_steps)):
        if value is not None and not args.rank_check:
            raise SystemExit(f"error: {flag} only applies with --rank-check: add --rank-check or drop it")
    args.rank_steps = args.rank_steps or 100
    if args.rank_check and args.sync:
        raise SystemExit("error: --rank-check trains cells and --sync trains nothing: use one of them")
    args.rank_values = [v.strip() for v in args.rank_values.split(",") if v.strip()] if args.rank_values else None
    if args.rank_check and args.rank_values is not None and len(args.rank_values) < 2:
        raise SystemExit("error: --rank-values: give at least two values to rank, e.g. --rank-values 1e-3,3e-3")
    return args


def load(spec: dict):
    """The run config: compare_cpu.yaml with the suite's and the command line's overrides (a bad one: one line)."""
    from rlora.config import ConfigError, load_config

    try:
        return load_config(CONFIG, spec["overrides"])
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def run_sets(cfg, spec: dict, work: Path, sets: list[str]) -> dict:
    """Train what is missing of ``sets`` and report them (and, with every set, the pooled report)."""
    from rlora.compare.suite import Suite
    from rlora.compare.tune import parse_tune
    from rlora.config import ConfigError

    try:
        arms = [(m, "proportional") for m in spec["methods"]]
        return Suite(cfg, arms, spec["seeds"], "lora", "ab", work, sets=sets, tune=parse_tune(spec["tune"], cfg),
                     tune_steps=spec["tune_steps"], val_rows=spec["val_rows"], local=True,
                     set_index={s: SETS.index(s) for s in sets}).run()
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: Optional[list[str]] = None) -> dict:
    """Copy the stored cells in, train (unless ``--sync``), copy the finished cells out (whatever happened),
    print the progress, and write the report once every set is done."""
    args = arguments(argv)
    base = QUICK if args.quick else FULL
    spec = dict(base, seeds=args.seeds or base["seeds"], overrides=base["overrides"] + args.overrides)
    cfg = load(spec)
    spec["seed"] = cfg.trainer.seed
    tag = "suite_quick" if args.quick else "suite"
    work, out = Path(args.work or REPO / "outputs" / tag), Path(args.out)
    store = out / f"{tag}_cells"
    print(f"[suite] {copy_cells(store, work)} committed cells copied into {work}", flush=True)
    result: dict = {}
    try:
        if args.rank_check:
            checked = rank_check(cfg, spec, work, args.sets, args.rank_values, args.rank_steps)
        elif not args.sync:
            result = run_sets(cfg, spec, work, args.sets)
    finally:
        print(f"[suite] {copy_cells(work, store)} finished cells copied to {store}", flush=True)
    if args.rank_check:
        figs = write_rank_check(checked, args.rank_steps, spec["tune_steps"] or cfg.trainer.max_steps,
                                spec["val_rows"], out, tag)
        print((out / f"{tag}_rank_check.md").read_text(), flush=True)
        emit(f"{tag}_rank_check", figs, args.json)
        return checked
    wall = progress(work, SETS, spec)
    for s, p in wall.items():
        print(f"[suite] {s}: tuning {p['tuning_cells']}, verdict {p['verdict_cells']} cells, "
              f"{p['cell_hours']} h of cell time; picks "
              + (", ".join(f"{m} {v}" for m, v in p["picks"].items()) or "none yet"), flush=True)
    for s in result.get("sets") or {}:
        write_set(work, out, tag, s)
        print(f"[suite] {s}: report in {out / f'{tag}_{s}.md'}", flush=True)
    whole = args.sets == SETS
    if result.get("pooled") and whole:
        write_report(work, out, tag, spec, wall)
        print(f"[suite] report: {out / (tag + '.md')}", flush=True)
    # a run of some of the sets pools only those: its figures carry no pooled value and another name, so nothing
    # that collects benchmark lines can take them for the suite's
    emit(tag if whole else f"{tag}_partial", figures(result, pooled_too=whole), args.json)
    return result


if __name__ == "__main__":
    main()
