"""Mutation testing of the modules that carry correctness claims (``make mutate``; not part of ``make test``).

Each group below is a set of source files and the small, fast test files that cover them (tiny models, no
Ray, ``-m "not slow"``). For every group this script

1. exports ``rlora/``, ``tests/`` and ``pyproject.toml`` of a git revision (default ``HEAD``; the working
   tree with ``--worktree``) into ``build/mutation/<group>/``, so the checkout itself is never mutated;
2. writes that copy's ``setup.cfg`` ``[mutmut]`` section (files to mutate, tests to run) and runs
   ``mutmut run --max-children 1`` there under ``nice -n 10`` with one torch/OpenMP thread. mutmut first
   runs the group's tests once and records which tests reach which function, then runs, for each mutant,
   only the tests that reach the mutated function;
3. writes ``benchmarks/results/mutation/<group>.json``: the kill rate per file, every surviving mutant with
   its diff and its note from ``benchmarks/results/mutation/notes.toml`` (why it is equivalent, or why it is
   left), and the wall time. ``summary.md`` there is rebuilt from all group reports.

Kill rate = (killed + timeout + segfault) / all mutants; a mutant that no selected test reaches
("no tests") counts as not killed. mutmut's names (``rlora.layers.base.xǁMultiHeadLoRALinearǁforward__mutmut_3``)
number the mutations within one function, so a note stays attached as long as that function is unchanged.

``--resume`` continues in the existing ``build/mutation/<group>/`` instead of exporting a fresh copy: it copies
the group's test files and the files it mutates from the working tree into that copy, runs mutmut there (which
keeps every verdict of an unchanged function and checks the rest: never-checked mutants, and all mutants of a
function whose source changed), then re-runs every survivor by name, so that new tests get their chance. Sound
only while tests were added or strengthened since the copy was made (a killed mutant stays killed); the wall
times of the runs on one copy add up in ``build/mutation/<group>/wall.json``.

Usage: ``python tests/mutations/mutate.py [GROUP ...] [--rev REV | --worktree | --resume] [--list]``; ``mutmut show
NAME`` and ``mutmut browse`` in ``build/mutation/<group>/`` show the details of the last run.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "build" / "mutation"
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
NOTES = RESULTS / "notes.toml"
DETECTED = ("killed", "timeout", "segfault")

# group: (files to mutate, test files that cover them). Order: the acceptance modules first.
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "layers": (["rlora/layers/*.py"],
               ["tests/layers/test_layers.py", "tests/layers/test_layers_exact.py", "tests/layers/test_dropout.py",
                "tests/layers/test_fused.py"]),
    "compare_stats": (["rlora/compare/stats.py", "rlora/compare/bootstrap.py"],
                      ["tests/compare/test_stats.py", "tests/compare/test_stats_exact.py",
                       "tests/compare/test_bootstrap.py"]),
    "batches": (["rlora/train/batches.py"], ["tests/train/test_batches.py"]),
    "compare_rest": (["rlora/compare/budget.py", "rlora/compare/cells.py", "rlora/compare/grid.py",
                      "rlora/compare/report.py", "rlora/compare/summary.py"],
                     ["tests/compare/test_budget.py", "tests/compare/test_cells.py", "tests/compare/test_grid.py",
                      "tests/compare/test_report.py", "tests/compare/test_pooled.py",
                      "tests/compare/test_align_compare.py"]),
    "sampler": (["rlora/sampler/*.py"],
                ["tests/sampler/test_strategies.py", "tests/sampler/test_dynamic.py", "tests/sampler/test_budget.py",
                 "tests/sampler/test_errors.py", "tests/sampler/test_resume.py"]),
    "fold": (["rlora/export/fold.py"], ["tests/export/test_fold.py"]),
    # the training step only (mutant-name glob below), in one process with a tiny model
    "loop_step": (["rlora/train/loop.py"], ["tests/train/test_train_step.py"]),
}
# groups that mutate only some functions of their files: mutmut mutant-name globs
ONLY: dict[str, list[str]] = {"loop_step": ["rlora.train.loop.xǁTrainerǁtrain_step__mutmut_*"]}


def export_tree(dest: Path, rev: str | None) -> str:
    """Copy rlora/, tests/ and pyproject.toml of ``rev`` (None: the working tree) into ``dest``; returns a label."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    paths = ["rlora", "tests", "pyproject.toml"]
    if rev is None:
        for p in paths:
            src = ROOT / p
            if src.is_dir():
                shutil.copytree(src, dest / p, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, dest / p)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return f"working tree on {head.stdout.strip()}"
    archive = subprocess.run(["git", "archive", rev, *paths], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True)
    return sha.stdout.strip()


def write_config(dest: Path, files: list[str], tests: list[str]) -> None:
    """The ``[mutmut]`` section (pyproject.toml has none, so mutmut reads setup.cfg)."""
    lines = ["[mutmut]", "source_paths = rlora", "only_mutate ="] + [f"    {f}" for f in files]
    # the suite's coverage recorder (tests/coverage_trace.py) is for whole-suite runs: mutmut runs pytest several
    # times in one process, and the mutants' verdicts need no trace
    lines += ["pytest_add_cli_args =", "    -m", "    not slow", "    -p", "    no:cacheprovider",
              "    -p", "    no:rlora-coverage-trace", "    -q"]
    lines += ["pytest_add_cli_args_test_selection ="] + [f"    {t}" for t in tests]
    # a mutant is a timeout (= detected) once its tests run 5 x (their clean time + 10 s) (mutmut's default:
    # 15 x (clean + 1 s)): the clean time leaves out fixture set-up (a tiny model: seconds on a busy machine), which
    # the 10 s cover, and a mutant that loops forever (an epoch budget never met) costs ~1 min instead of ~2-3
    lines += ["timeout_multiplier = 5", "timeout_constant = 10"]
    (dest / "setup.cfg").write_text("\n".join(lines) + "\n")


def module_of(name: str) -> str:
    """``rlora.layers.base.xǁCǁf__mutmut_3`` -> ``rlora/layers/base.py``."""
    return name.rsplit(".", 1)[0].replace(".", "/") + ".py"


def collect(dest: Path) -> dict[str, str]:
    """mutant name -> status, from the ``.meta`` files mutmut leaves next to each mutated file."""
    from mutmut.stats import status_by_exit_code
    out = {}
    for meta in sorted((dest / "mutants").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = status_by_exit_code[code]
    return out


def diff_of(dest: Path, mutmut: str, name: str) -> str:
    shown = subprocess.run([mutmut, "show", name], cwd=dest, capture_output=True, text=True)
    lines = [ln for ln in shown.stdout.splitlines() if ln.startswith(("-", "+")) and not ln.startswith(("---", "+++"))]
    return "\n".join(lines)


def _mutmut_run(group: str, dest: Path, args: list[str], log_name: str) -> float:
    """``mutmut run --max-children 1 ARGS`` in ``dest`` under nice 10 with one thread; returns the wall time."""
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONHASHSEED="0")
    t0 = time.monotonic()
    with open(dest / log_name, "w") as log:
        rc = subprocess.run(["nice", "-n", "10", mutmut, "run", "--max-children", "1", *args], cwd=dest, env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    if rc != 0:
        tail = (dest / log_name).read_text(errors="replace")[-3000:]
        raise SystemExit(f"mutate: mutmut failed for group {group!r} (exit {rc}); last lines of "
                         f"{dest / log_name}:\n{tail}")
    return wall


def _add_wall(dest: Path, what: str, seconds: float, fresh: bool) -> float:
    """Record one run's wall time in ``dest/wall.json``; returns the total over the runs on this copy."""
    path = dest / "wall.json"
    runs = [] if fresh or not path.exists() else json.loads(path.read_text())["runs"]
    runs.append({"what": what, "wall_s": round(seconds, 1)})
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    return sum(r["wall_s"] for r in runs)


def run_group(group: str, rev: str | None, notes: dict) -> dict:
    files, tests = GROUPS[group]
    dest = WORK / group
    source = export_tree(dest, rev)
    write_config(dest, files, tests)
    wall = _mutmut_run(group, dest, ONLY.get(group, []), "mutmut.log")
    return report(group, dest, source, _add_wall(dest, f"full run of {source}", wall, fresh=True), notes)


def sync_tree(dest: Path, files: list[str], tests: list[str]) -> list[str]:
    """Copy the working tree's versions of the mutated files and the test files into an existing copy (the tests
    into ``mutants/`` too: mutmut copies them there only once); returns the paths that changed."""
    changed = []
    sources = sorted({p for pattern in files for p in ROOT.glob(pattern)})
    for src in sources + [ROOT / t for t in tests]:
        rel = src.relative_to(ROOT)
        targets = [dest / rel] + ([dest / "mutants" / rel] if str(rel) in tests else [])
        for target in targets:
            if not target.exists() or target.read_bytes() != src.read_bytes():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)  # a new mtime: mutmut regenerates the mutants of a changed source
                changed.append(str(target.relative_to(dest)))
    return changed


def resume_group(group: str, notes: dict) -> dict:
    files, tests = GROUPS[group]
    dest = WORK / group
    if not (dest / "mutants").is_dir():
        raise SystemExit(f"mutate: no earlier run of {group!r} in {dest}: run the group without --resume first")
    changed = sync_tree(dest, files, tests)
    print(f"mutate: {group}: copied {len(changed)} changed file(s) into {dest}", flush=True)
    wall = _mutmut_run(group, dest, ONLY.get(group, []), "mutmut-resume.log")
    survivors = [k for k, v in collect(dest).items() if v in ("survived", "no tests")]
    if group in ONLY:
        survivors = [k for k in survivors if any(fnmatch.fnmatchcase(k, g) for g in ONLY[group])]
    if survivors:
        wall += _mutmut_run(group, dest, survivors, "mutmut-survivors.log")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    source = f"working tree on {head.stdout.strip()} (resumed)"
    return report(group, dest, source, _add_wall(dest, f"resume on {source}", wall, fresh=False), notes)


def report_interrupted(group: str, notes: dict) -> dict:
    """The report of a run that was stopped: the mutants checked so far (the others are counted as
    not checked); the source is the last commit before the copy was made, the wall time up to the last result."""
    dest = WORK / group
    started = (dest / "setup.cfg").stat().st_mtime
    last = max(m.stat().st_mtime for m in (dest / "mutants").rglob("*.py.meta"))
    sha = subprocess.run(["git", "rev-list", "-1", "--abbrev-commit", f"--before={int(started)}", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    return report(group, dest, f"{sha} (stopped)", last - started, notes)


def report(group: str, dest: Path, source: str, wall: float, notes: dict) -> dict:
    files, tests = GROUPS[group]
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    status = collect(dest)
    if group in ONLY:
        status = {k: v for k, v in status.items() if any(fnmatch.fnmatchcase(k, g) for g in ONLY[group])}
    unchecked = Counter(module_of(k) for k, v in status.items() if v == "not checked")
    status = {k: v for k, v in status.items() if v != "not checked"}
    per_module: dict[str, Counter] = {}
    for name, st in status.items():
        per_module.setdefault(module_of(name), Counter())[st] += 1
    modules = {}
    for mod, c in sorted(per_module.items()):
        total = sum(c.values())
        killed = sum(c[s] for s in DETECTED)
        modules[mod] = {"mutants": total, "killed": killed, "kill_rate": round(killed / total, 4) if total else None,
                        "by_status": dict(sorted(c.items())), "not_checked": unchecked[mod]}
    survivors = []
    for name, st in sorted(status.items()):
        if st in DETECTED:
            continue
        note = notes.get(name, {})
        survivors.append({"name": name, "status": st, "diff": diff_of(dest, mutmut, name),
                          "verdict": note.get("verdict", "unexplained"), "why": note.get("why", "")})
    total = sum(m["mutants"] for m in modules.values())
    killed = sum(m["killed"] for m in modules.values())
    return {"group": group, "source": source, "files": files, "tests": tests,
            "mutmut": _version(), "wall_s": round(wall, 1),
            "total": {"mutants": total, "killed": killed, "kill_rate": round(killed / total, 4) if total else None},
            "modules": modules, "survivors": survivors}


def _version() -> str:
    from importlib.metadata import version
    return version("mutmut")


def summary(reports: list[dict]) -> str:
    lines = ["# Mutation testing (`make mutate`)", "",
             "Written by `tests/mutations/mutate.py` from the group reports beside this file; survivors' notes come from "
             "`notes.toml`. Kill rate = (killed + timeout + segfault) / mutants; \"without equivalents\" leaves "
             "out the survivors noted as equivalent (no input tells them apart). \"source\" is the commit mutated.",
             "",
             "| group | source | file | mutants | killed | kill rate | without equivalents | survivors (equivalent / left / unexplained) |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in reports:
        for mod, m in r["modules"].items():
            surv = [s for s in r["survivors"] if module_of(s["name"]) == mod]
            v = Counter(s["verdict"] for s in surv)
            real = m["mutants"] - v["equivalent"]
            more = f" (+{m['not_checked']} not checked)" if m.get("not_checked") else ""
            lines.append(f"| {r['group']} | {r['source']} | `{mod}` | {m['mutants']}{more} | {m['killed']} | "
                         f"{100 * m['kill_rate']:.1f} % | {100 * m['killed'] / max(real, 1):.1f} % | {len(surv)} "
                         f"({v['equivalent']} / {v['left']} / {v['unexplained']}) |")
    lines += ["", "| group | mutmut | wall time (2 cores shared, nice 10, one process) | tests |", "|---|---|---:|---|"]
    for r in reports:
        lines.append(f"| {r['group']} | {r['mutmut']} | {r['wall_s'] / 60:.1f} min | "
                     + ", ".join(f"`{t}`" for t in r["tests"]) + " |")
    for r in reports:
        if not r["survivors"]:
            continue
        lines += ["", f"## Survivors: {r['group']}", ""]
        for s in r["survivors"]:
            diff = s["diff"].replace("\n", "` / `") if s["diff"] else "(no diff)"
            why = f": {s['why']}" if s["why"] else ""
            lines.append(f"- `{s['name']}` ({s['status']}), **{s['verdict']}**{why}  \n  `{diff}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("groups", nargs="*", help=f"groups to run (default: all): {', '.join(GROUPS)}")
    ap.add_argument("--rev", default="HEAD", help="git revision to mutate (default HEAD)")
    ap.add_argument("--worktree", action="store_true", help="mutate the working tree instead of --rev")
    ap.add_argument("--resume", action="store_true",
                    help="continue in the existing build/mutation/<group> with the working tree's tests and sources")
    ap.add_argument("--list", action="store_true", help="print the groups and exit")
    ap.add_argument("--collect-stopped", action="store_true",
                    help="write the reports of stopped runs from build/mutation/<group> (runs nothing)")
    ap.add_argument("--renote", action="store_true",
                    help="re-read notes.toml into the existing reports and rebuild summary.md (runs nothing)")
    args = ap.parse_args(argv)
    if args.list:
        for g, (files, tests) in GROUPS.items():
            print(f"{g}: {' '.join(files)}  <-  {' '.join(tests)}")
        return 0
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        print(f"mutate: unknown group {unknown[0]!r}: use one of {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    notes = tomllib.loads(NOTES.read_text()) if NOTES.exists() else {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for g in (args.groups or list(GROUPS)) if args.renote else []:
        path = RESULTS / f"{g}.json"
        if path.exists():
            rep = json.loads(path.read_text())
            for sv in rep["survivors"]:
                note = notes.get(sv["name"], {})
                sv["verdict"], sv["why"] = note.get("verdict", "unexplained"), note.get("why", "")
            path.write_text(json.dumps(rep, indent=1, ensure_ascii=False) + "\n")
    for g in args.groups if args.collect_stopped else []:
        rep = report_interrupted(g, notes)
        (RESULTS / f"{g}.json").write_text(json.dumps(rep, indent=1, ensure_ascii=False) + "\n")
    for g in [] if args.renote or args.collect_stopped else (args.groups or list(GROUPS)):
        print(f"mutate: {g} ...", flush=True)
        rep = resume_group(g, notes) if args.resume else run_group(g, None if args.worktree else args.rev, notes)
        (RESULTS / f"{g}.json").write_text(json.dumps(rep, indent=1, ensure_ascii=False) + "\n")
        t = rep["total"]
        print(f"mutate: {g}: {t['killed']}/{t['mutants']} killed ({100 * t['kill_rate']:.1f} %), "
              f"{len(rep['survivors'])} survivors, {rep['wall_s'] / 60:.1f} min", flush=True)
    reports = [json.loads((RESULTS / f"{g}.json").read_text()) for g in GROUPS if (RESULTS / f"{g}.json").exists()]
    (RESULTS / "summary.md").write_text(summary(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
