"""Apply each mutation of the "tests that bite" table to a clean copy of the repository, one at a time, and run
the tests that must catch it.

    .venv/bin/python tests/mutations/apply_table.py [--only NAME ...] [--rev HEAD] [--trace DIR] [--keep]

The copy is ``git archive REV`` (committed files only: nobody's uncommitted work) unpacked in a temporary
folder. For every mutation the script first checks that the mutated text is there exactly once (else it reports
the mutation as not applied: the code moved and the table needs updating), writes the mutated file, runs
``python -m pytest`` on the mutation's tests in the copy with this repository's interpreter (the copy's
``rlora`` first on ``PYTHONPATH``, checked), prints the tests that failed and restores the file. Before the
mutations every mutation's test list runs once on the unmutated copy: a test that already fails there proves
nothing, and is reported. A whole test file runs without its slow tests; tests named one by one run as named.

A mutation is *caught* when at least one of its tests fails (and that test passed unmutated). The exit status
is the number of mutations not caught.

The first six rows are the issue's table (plus ``compare overrides``, a row of the table without a mutation);
the others break the benchmarks' timing code and the bootstrap's seed level. ``trainer.label_smoothing`` (a new
field that nothing reads) is caught only by the whole-suite coverage check
(tests/test_config_coverage.py), which judges a trace of every test of the suite: pass ``--trace DIR`` with the
trace folder of a full ``make test`` run on the same revision (its contents are copied, never changed); without
it that mutation is reported as not run.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Mutation:
    name: str
    what: str
    edits: list[tuple[str, str, str]]  # (path, text, replacement): the text must occur exactly once
    tests: list[str]  # pytest node ids (files or tests) that must catch it
    needs_trace: bool = False


STEP_LOOP = "        for batch in batches:\n            loss, s, c = forward_loss("
BACKWARD = "            self.engine.backward(loss)\n"
MATRIX = "tests/train/test_matrix.py"
COMPARE_TESTS = ["tests/compare/test_verb.py::test_samplers_and_baseline_choose_the_arms_and_the_comparisons",
                 "tests/compare/test_cli.py::test_bad_flags_are_one_line_errors"]
# both train mutations run the same tests (one baseline run); the accumulation test and test_train_step.py (a
# stand-in engine and config without ZeRO) run no ZeRO-3, so only test_feature_matrix can catch the ZeRO-3
# mutation (written to read the stage defensively, so that the stand-in config does not fail it by accident)
TRAIN_TESTS = [f"{MATRIX}::test_accumulation_equals_the_larger_batch", f"{MATRIX}::test_feature_matrix",
               "tests/train/test_train_step.py::test_accumulated_gradient_is_the_step_token_mean"]
ROUND_LOOP = ("            for k, fn in fns.items():\n                t0 = time.perf_counter()\n"
              "                fn()\n")
ROUND_LOOP_MUTATED = ("            t0 = time.perf_counter()\n            for k, fn in fns.items():\n"
                      "                fn()\n")

MUTATIONS = [
    Mutation("label_smoothing", "a new field trainer.label_smoothing (float, default 0.0) that nothing reads",
             [("rlora/config.py", "    gradient_accumulation_steps: int = 1\n",
               "    gradient_accumulation_steps: int = 1\n    label_smoothing: float = 0.0\n")],
             ["tests/test_config_coverage.py"], needs_trace=True),
    Mutation("n_boot_fixed", "rlora compare passes n_boot=2000 whatever --n-boot says",
             [("rlora/compare/cli.py", "n_boot=args.n_boot", "n_boot=2000")],
             COMPARE_TESTS),
    Mutation("compare_overrides_dropped", "rlora compare ignores the dotted overrides on its command line",
             [("rlora/compare/cli.py", "load_config(args.config, args.overrides)", "load_config(args.config, [])")],
             COMPARE_TESTS),
    Mutation("alias_fixed", "rlora register passes alias='challenger' whatever --alias says",
             [("rlora/export/cli.py", "alias=args.alias", "alias='challenger'")],
             ["tests/export/test_registry.py::test_promotion_moves_the_champion_alias",
              "tests/export/test_registry.py::test_cli_invalid_name_is_one_line_and_registers_nothing"]),
    Mutation("experiment_fixed", "rlora register passes experiment=None whatever --experiment says",
             [("rlora/export/cli.py", "experiment=args.experiment", "experiment=None")],
             ["tests/export/test_registry.py::test_cli_task_and_base_model_are_recorded_on_the_version"]),
    Mutation("per_micro_batch_mean", "normalizer=None when gradient_accumulation_steps > 1: each micro-batch's "
             "loss is its own token mean",
             [("rlora/train/loop.py", "normalizer=normalizer, autocast=", "normalizer=normalizer if ga == 1 else None, "
               "autocast=")],
             TRAIN_TESTS),
    Mutation("zero3_drop_last_micro_batch", "under ZeRO-3 with gradient_accumulation_steps > 1 the last "
             "micro-batch's gradient is dropped (its loss times 0)",
             [("rlora/train/loop.py", STEP_LOOP, STEP_LOOP.replace("for batch in batches", "for i, batch in "
                                                                   "enumerate(batches)")),
              ("rlora/train/loop.py", BACKWARD, BACKWARD.replace(
                  "backward(loss)", "backward(loss * 0 if getattr(getattr(self.cfg, 'deepspeed', None), 'stage', 0) == 3 "
                  "and ga > 1 and i == ga - 1 else loss)"))],
             TRAIN_TESTS),
    Mutation("bench_ratio_inverted", "benchmarks/_common.py's ratios() returns den / num",
             [("benchmarks/_common.py", "return [a / b for a, b in zip(num, den)]",
               "return [b / a for a, b in zip(num, den)]")],
             ["tests/test_benchmarks.py"]),
    Mutation("bench_first_call_per_round", "interleaved_rounds keeps each round's first call instead of the "
             "median of its calls",
             [("benchmarks/_common.py", "out[k].append(statistics.median(v))", "out[k].append(v[0])")],
             ["tests/test_benchmarks.py"]),
    Mutation("bench_round_clock", "interleaved_rounds times every contender from the start of the round (each "
             "call's time includes the calls before it)",
             [("benchmarks/_common.py", ROUND_LOOP, ROUND_LOOP_MUTATED)],
             ["tests/test_benchmarks.py"]),
    Mutation("bootstrap_no_seed_level", "the bootstrap never resamples seeds (always the observed seeds)",
             [("rlora/compare/bootstrap.py", "if num_seeds > 1:", "if False:")],
             ["tests/compare/test_coverage.py"]),
]


def run(cmd, cwd, env, timeout=3600):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def pytest_outcome(copy: Path, env: dict, tests: list[str]) -> tuple[int, list[str], str]:
    """(exit status, failed/errored node ids, pytest's summary line). A whole file runs without its slow
    (multi-process) tests; tests named one by one run whatever their marks."""
    marks = ["-m", "not slow"] if any("::" not in t for t in tests) else []
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *marks, *tests], copy, env)
    out = proc.stdout + proc.stderr
    failed = sorted({m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", out, re.M)})
    summary = ([ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)]
               or [out.strip().splitlines()[-1] if out.strip() else f"exit {proc.returncode}"])[-1]
    return proc.returncode, failed, summary.strip("= ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="mutation names (default: all)")
    p.add_argument("--rev", default="HEAD", help="the revision to copy (default HEAD)")
    p.add_argument("--trace", help="trace folder of a full `make test` run (for label_smoothing)")
    p.add_argument("--keep", action="store_true", help="keep the copy (its path is printed)")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        known = ", ".join(m.name for m in MUTATIONS)
        raise SystemExit(f"--only: unknown mutation in {args.only}: use some of {known}")

    root = Path(tempfile.mkdtemp(prefix="rlora-mutations-"))
    copy = root / "repo"
    copy.mkdir()
    archive = subprocess.run(["git", "archive", args.rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    if (REPO.parent / "shared").is_dir():  # the data sets beside the checkout, as CI has them
        (root / "shared").symlink_to((REPO.parent / "shared").resolve())
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    env = dict(os.environ, PYTHONPATH=str(copy), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RLORA_TRACE_DIR", None)
    where = run([sys.executable, "-c", "import rlora; print(rlora.__file__)"], copy, env).stdout.strip()
    if not where.startswith(str(copy)):
        raise SystemExit(f"the copy's rlora is not the one imported ({where}): check PYTHONPATH")
    print(f"clean copy of {args.rev} ({rev}) in {copy}; rlora imported from the copy", flush=True)

    clean: dict[tuple, list[str]] = {}  # test list -> tests failing on the unmutated copy
    for m in chosen:
        key = tuple(m.tests)
        if key in clean or (m.needs_trace and not args.trace):
            continue
        t0 = time.time()
        run_env = dict(env)
        if m.needs_trace:
            run_env["RLORA_TRACE_DIR"] = str(shutil.copytree(args.trace, root / "trace-clean"))
        _, clean[key], summary = pytest_outcome(copy, run_env, m.tests)
        print(f"unmutated {' '.join(m.tests)}: {summary} ({time.time() - t0:.0f} s)"
              + (f"; failing already: {clean[key]}" if clean[key] else ""), flush=True)

    missed = 0
    for m in chosen:
        print(f"\n== {m.name}: {m.what}", flush=True)
        if m.needs_trace and not args.trace:
            print("   NOT RUN: needs --trace (the trace folder of a full `make test` run on this revision)")
            missed += 1
            continue
        originals: dict[str, str] = {}
        try:
            for path, old, new in m.edits:
                originals.setdefault(path, (copy / path).read_text())
                current = (copy / path).read_text()
                if current.count(old) != 1:
                    raise LookupError(f"{path}: {old.strip()[:60]!r} occurs {current.count(old)} times")
                (copy / path).write_text(current.replace(old, new))
        except LookupError as e:
            print(f"   NOT APPLIED: {e}")
            missed += 1
            for path, text in originals.items():
                (copy / path).write_text(text)
            continue
        run_env = dict(env)
        if m.needs_trace:
            run_env["RLORA_TRACE_DIR"] = str(shutil.copytree(args.trace, root / f"trace-{m.name}"))
        t0 = time.time()
        status, failed, summary = pytest_outcome(copy, run_env, m.tests)
        for path, text in originals.items():
            (copy / path).write_text(text)
        caught = [t for t in failed if t not in clean[tuple(m.tests)]]
        print(f"   tests: {' '.join(m.tests)}")
        print(f"   result: {summary} ({time.time() - t0:.0f} s)")
        if caught:
            print(f"   CAUGHT by {len(caught)} test(s):")
            for t in caught:
                print(f"     {t}")
        else:
            missed += 1
            print("   NOT CAUGHT" + (f" (failing, but already unmutated: {failed})" if failed else ""))
    print(f"\n{len(chosen) - missed} of {len(chosen)} mutations caught")
    if args.keep:
        print(f"copy kept in {copy}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return missed


if __name__ == "__main__":
    sys.exit(main())
