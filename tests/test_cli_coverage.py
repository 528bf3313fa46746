"""Every flag and positional of the ``rlora`` command line is proved by a test that passes it: some test must run
the real entry point (:func:`rlora.cli.main`, in the test process, a subprocess or a Ray job) with the flag set to
a value other than its default, pass, and pass an assertion afterwards (the same trace as
tests/test_config_coverage.py; calling the library underneath, or passing the default, does not count).

``KNOWN_GAPS`` lists flags no test can prove here, with why; it may only shrink.
"""
from __future__ import annotations

import argparse

import pytest

import coverage_trace

KNOWN_GAPS: dict[str, str] = {}  # none; a new flag comes with its effect test


def cli_flags() -> list[str]:
    """``"command flag"`` for every option and positional of ``rlora`` and its sub-commands."""
    from rlora._trace import _flag_name
    from rlora.cli import _load_extra_commands, build_parser

    _load_extra_commands()
    out: list[str] = []

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, name)
            elif not isinstance(a, argparse._HelpAction):
                out.append(f"{prefix} {_flag_name(a)}".strip())

    walk(build_parser(), "")
    return out


def test_the_walk_sees_every_command():
    flags = cli_flags()
    assert {"train --local", "compare --budget", "export --format", "submit --pip", "--debug"} <= set(flags)
    assert not set(KNOWN_GAPS) - set(flags), "KNOWN_GAPS names flags that rlora does not have"


def test_main_records_the_flags_given_other_than_their_defaults(tmp_path, monkeypatch):
    """Through :func:`rlora.cli.main`: the flags set (``--n-boot 500``, ``--debug`` after the sub-command) are
    recorded, a flag given its default (``--seeds 3``) and the flags left out are not."""
    from rlora import _trace
    from rlora.cli import main

    monkeypatch.setattr(_trace, "_DIR", str(tmp_path))
    monkeypatch.setattr(_trace, "_seen", set())
    monkeypatch.setattr(_trace, "_test_here", "t.py::test_cli")
    from rlora.config import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):  # --debug: the error is raised, not printed
        main(["compare", str(tmp_path / "missing.yaml"), "--n-boot", "500", "--seeds", "3", "--debug",
              "trainer.max_steps=2"])
    (tmp_path / "results-1.tsv").write_text("t.py::test_cli\t1\t1\t9999999999\n")
    monkeypatch.setattr(coverage_trace, "TRACE_DIR", tmp_path)
    flags, _ = coverage_trace.coverage("flag")
    assert sorted(flags) == ["--debug", "compare --n-boot", "compare config", "compare overrides"]


@pytest.mark.coverage_check
def test_every_flag_is_passed_and_asserted_on_by_a_test():
    reason = coverage_trace.incomplete_reason()
    if reason:
        pytest.skip(reason)
    message = coverage_trace.uncovered_message([f for f in cli_flags() if f not in KNOWN_GAPS], "flag")
    assert not message, ("rlora flags and positionals that no passing test gives a non-default value on the "
                         "command line and asserts on afterwards (write a test that shows the flag's effect):\n"
                         + message)
    proved, _ = coverage_trace.coverage("flag")
    healed = sorted(set(KNOWN_GAPS) & set(proved))
    assert not healed, f"KNOWN_GAPS lists flags a test now proves: {healed}: remove them from KNOWN_GAPS"
