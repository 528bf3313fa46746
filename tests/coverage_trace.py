"""The test suite's record of which config fields and CLI flags each test used, and what it asserted.

Imported first by tests/conftest.py: it sets ``$RLORA_TRACE_DIR`` (the one `make test` names, shared by its two
pytest processes, else a fresh folder for this session) before anything imports rlora, so this process, its
subprocesses and Ray's workers record the fields read and flags parsed with non-default values
(:mod:`rlora._trace`). The :class:`Recorder` plugin writes, in the same folder:

* ``current``: the node id of the test now running (what every process attributes its reads to);
* ``results-<pid>.tsv``: one line per test, ``test, passed (all phases), passed assertions, time of the last``.
  An assertion is a passing ``assert`` statement of a test module (counted where pytest's rewritten assert
  asks whether to call ``pytest_assertion_pass``: ``enable_assertion_pass_hook`` in pyproject.toml), a returning
  ``torch.testing.assert_close`` / ``numpy.testing.assert_allclose`` / ``assert_array_equal``, or a
  ``pytest.raises`` that caught its exception
  (some knobs' effect is an error or a traceback, ``--debug``; so the trace cannot tell a test of an error path
  from a test of the effect: the tests themselves must);
* ``session-<pid>.json``: this session's marker expression and whether it selected the whole suite.

:func:`coverage` answers, for every name of a kind, the tests that set it to a non-default value, passed and
asserted after their first such read. Items marked ``coverage_check`` run after every other test of the session.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("RLORA_TRACE_DIR"):
    TRACE_DIR, OWN_DIR = Path(os.environ["RLORA_TRACE_DIR"]).resolve(), False
    TRACE_DIR.mkdir(parents=True, exist_ok=True)
else:
    TRACE_DIR, OWN_DIR = Path(tempfile.mkdtemp(prefix="rlora-trace-")), True
os.environ["RLORA_TRACE_DIR"] = str(TRACE_DIR)

from rlora import _trace  # noqa: E402  (after the variable: rlora/_trace.py reads it at import)

ASSERT_FUNCTIONS = (("torch.testing", "assert_close"), ("numpy.testing", "assert_allclose"),
                    ("numpy.testing", "assert_array_equal"))


class Recorder:
    """pytest plugin: the current test for every process, passed assertions and outcomes per test."""

    def __init__(self) -> None:
        self.nodeid: Optional[str] = None
        self.asserts: dict[str, list] = defaultdict(lambda: [0, 0.0])  # nodeid -> [count, time of the last]
        self.failed: set[str] = set()

    def note_assert(self, nodeid: Optional[str]) -> None:
        if nodeid is not None:
            entry = self.asserts[nodeid]
            entry[0] += 1
            entry[1] = time.time()

    def pytest_configure(self, config) -> None:
        from _pytest.config import Config

        complete = (config.args_source == Config.ArgsSource.TESTPATHS and not config.option.keyword
                    and not config.option.deselect and not getattr(config.option, "lf", False)
                    and not getattr(config.option, "stepwise", False))
        (TRACE_DIR / f"session-{os.getpid()}.json").write_text(json.dumps(
            {"markexpr": " ".join((config.option.markexpr or "").split()), "complete": complete}))
        self._wrap_assert_functions()
        self._count_passing_asserts()
        self._drop_stale_rewrites()

    def _count_passing_asserts(self) -> None:
        """With ``enable_assertion_pass_hook`` the rewritten ``assert`` calls
        ``_pytest.assertion.rewrite._check_if_assertion_pass_impl()`` after it passed, and only when that is true
        formats its explanation (the repr of every operand) for ``pytest_assertion_pass``: several seconds over
        the suite's assert-heavy loops. Counting there and answering false costs one call per assert.
        (Without that function, a future pytest, :meth:`pytest_assertion_pass` counts instead.)"""
        from _pytest.assertion import rewrite

        if hasattr(rewrite, "_check_if_assertion_pass_impl"):
            def count_and_skip_the_explanation() -> bool:
                self.note_assert(self.nodeid)
                return False

            rewrite._check_if_assertion_pass_impl = count_and_skip_the_explanation

    def _wrap_assert_functions(self) -> None:
        import importlib

        import pytest

        if not getattr(pytest.raises, "_counted", False):
            pytest.raises = self._counted_raises(pytest.raises)
        for module, name in ASSERT_FUNCTIONS:
            mod = importlib.import_module(module)
            fn = getattr(mod, name)
            if getattr(fn, "_counted", False):
                continue

            def counted(*args, __fn=fn, **kwargs):
                out = __fn(*args, **kwargs)
                self.note_assert(self.nodeid)
                return out

            counted._counted = True
            setattr(mod, name, counted)

    def _counted_raises(self, raises):
        recorder = self

        class Counted:
            """``pytest.raises``' context manager; an exit that caught the expected exception counts."""

            def __init__(self, ctx):
                self._ctx = ctx

            def __enter__(self):
                return self._ctx.__enter__()

            def __exit__(self, *exc):
                caught = self._ctx.__exit__(*exc)
                if caught:
                    recorder.note_assert(recorder.nodeid)
                return caught

            def __getattr__(self, name):
                return getattr(self._ctx, name)

        def counted(*args, **kwargs):
            out = raises(*args, **kwargs)
            if not hasattr(out, "__exit__"):  # the call form returned: the exception was raised and matched
                recorder.note_assert(recorder.nodeid)
                return out
            return Counted(out)

        counted._counted = True
        return counted

    @staticmethod
    def _drop_stale_rewrites() -> None:
        """pytest reuses a test module's rewritten .pyc whatever ``enable_assertion_pass_hook`` was when it was
        written; one older than pyproject.toml may lack the hook's calls, so it is rewritten afresh."""
        stamp = (REPO / "pyproject.toml").stat().st_mtime
        for pyc in (REPO / "tests").rglob("__pycache__/*-pytest-*.pyc"):
            try:
                if pyc.stat().st_mtime < stamp:
                    pyc.unlink()
            except OSError:
                pass

    def pytest_collection_modifyitems(self, items) -> None:
        last = [it for it in items if it.get_closest_marker("coverage_check")]
        items[:] = [it for it in items if not it.get_closest_marker("coverage_check")] + last

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self.nodeid = nodeid
        _trace.set_current_test(nodeid)

    def pytest_assertion_pass(self, item, lineno, orig, expl) -> None:
        self.note_assert(item.nodeid)

    def pytest_runtest_logreport(self, report) -> None:
        if report.outcome != "passed":
            self.failed.add(report.nodeid)
        if report.when == "teardown":
            passed = report.nodeid not in self.failed
            count, last = self.asserts.pop(report.nodeid, (0, 0.0))
            with open(TRACE_DIR / f"results-{os.getpid()}.tsv", "a", encoding="utf-8") as f:
                f.write(f"{report.nodeid}\t{int(passed)}\t{count}\t{last:.6f}\n")

    def pytest_unconfigure(self, config) -> None:
        if OWN_DIR:
            import shutil

            shutil.rmtree(TRACE_DIR, ignore_errors=True)


def incomplete_reason() -> Optional[str]:
    """None when the sessions that wrote the trace folder ran the whole suite between them (one session with
    no ``-m``, or one ``-m slow`` and one ``-m "not slow"``, as `make test` does), else why the check cannot
    judge (a subset was selected)."""
    sessions = [json.loads(p.read_text()) for p in TRACE_DIR.glob("session-*.json")]
    full = {s["markexpr"] for s in sessions if s["complete"]}
    if "" in full or {"slow", "not slow"} <= full:
        return None
    return ("only part of the suite ran in this trace folder (selected by file, -k, --deselect, --lf or -m): "
            "the coverage check judges the whole suite, as `make test` runs it")


def _read_rows(pattern: str) -> list[list[str]]:
    rows = []
    for p in TRACE_DIR.glob(pattern):
        rows += [line.split("\t") for line in p.read_text(encoding="utf-8").splitlines() if line.count("\t") >= 3]
    return rows


def coverage(kind: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(name -> tests that prove it, name -> tests that only read it, each with why it does not count)."""
    results: dict[str, tuple[bool, int, float]] = {}
    for test, passed, count, last in _read_rows("results-*.tsv"):
        results[test] = (passed == "1", int(count), float(last))
    first: dict[tuple[str, str], float] = {}
    for k, test, name, when in _read_rows("reads-*.tsv"):
        if k == kind:
            first[(name, test)] = min(float(when), first.get((name, test), float("inf")))
    proved: dict[str, list[str]] = defaultdict(list)
    unproved: dict[str, list[str]] = defaultdict(list)
    for (name, test), when in sorted(first.items()):
        passed, count, last = results.get(test, (False, 0, 0.0))
        if test not in results:
            unproved[name].append(f"{test} (no result: not a test of this suite)")
        elif not passed:
            unproved[name].append(f"{test} (did not pass)")
        elif last < when:
            unproved[name].append(f"{test} (no passing assertion after the read)")
        else:
            proved[name].append(test)
    return dict(proved), dict(unproved)


def uncovered_message(names: list[str], kind: str) -> str:
    """The names of ``kind`` that no test proves, each with the tests that only read it."""
    proved, unproved = coverage(kind)
    missing = [n for n in names if n not in proved]
    lines = [f"{n}: " + ("; ".join(unproved[n][:3]) if n in unproved else "never set to a non-default value by "
                         "a test") for n in missing]
    return "\n".join(lines)
