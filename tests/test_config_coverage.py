"""Every knob of the run config is proved by a test that uses it: for each field of :class:`rlora.config.RunConfig`
(dotted, ``data.tasks[].x`` for the fields of one task) some test of the suite must set it to a value other than
its default, have it *read* by the code under test (in the test process, a subprocess or a Ray worker), pass, and
pass an assertion after that read (tests/coverage_trace.py records all three while the suite runs).

A field that nothing reads fails by itself: setting it is not enough, nor is validating it (reads by the schema's
validators do not count), nor logging it (``model_dump`` does not count). What the trace cannot tell is whether
the assertion looks at the field's effect; the tests named in each field's docs and in README.md do. Removed and
renamed fields are not knobs: old configs that use them get a one-line error (``rlora.config.REMOVED_FIELDS``,
tests/test_bad_inputs.py).

The whole-suite check runs last in a session that, with the sessions before it in the same trace folder, ran
every test (`make test`: ``-m slow`` then ``-m "not slow"``); on a subset it is skipped, saying so.
"""
from __future__ import annotations

import json
import time

import pytest

import coverage_trace
from rlora._trace import field_names
from rlora.config import REMOVED_FIELDS, RunConfig

REPO = coverage_trace.REPO

# fields no test here can prove, with why; may only shrink (a field that gets its test leaves this table)
KNOWN_GAPS: dict[str, str] = {}


def schema_fields() -> list[str]:
    """Every knob as a dotted name. A section (a field that is a model) is not a knob itself, its fields are; a
    collection of models (``data.tasks``) is a knob, and so is each field of an item (``data.tasks[].x``)."""
    return list(field_names(RunConfig).values())


def test_the_schema_walk_sees_sections_and_task_fields():
    fields = schema_fields()
    assert "trainer.learning_rate" in fields and "data.tasks" in fields and "data.tasks[].weight" in fields
    assert "trainer" not in fields and len(fields) == len(set(fields))
    removed = sorted(f"{s}.{k}" for s, k in REMOVED_FIELDS if f"{s}.{k}" in fields)
    assert not removed, f"removed fields are still in the schema: {removed}"
    assert not set(KNOWN_GAPS) - set(fields), "KNOWN_GAPS names fields that are not in RunConfig"


def test_the_trace_proves_only_fields_read_with_a_non_default_value_and_asserted_after(tmp_path, monkeypatch):
    """The mechanism on a known run, traced into its own folder: a field set but never read (``trainer.seed``,
    like a new field nothing uses), one read by a validator only, one set to its default, and a test that reads
    without asserting are all unproved; flags likewise."""
    from rlora import _trace
    from rlora.cli import _load_extra_commands, build_parser
    from rlora.config import load_config

    monkeypatch.setattr(_trace, "_DIR", str(tmp_path))
    monkeypatch.setattr(_trace, "_seen", set())
    monkeypatch.setattr(_trace, "_test_here", "t.py::test_reads")
    cfg = load_config(None, ["trainer.max_steps=7", "trainer.seed=3", "trainer.learning_rate=0.0002",
                             "deepspeed.stage=3", "deepspeed.offload_param=true",
                             "data.tasks=[{name: a, weight: 2.0}]"])
    # read: max_steps (set), learning_rate (set to its default), the task list and a task's weight; never read:
    # seed; offload_param is read only by the schema's validator; model_dump reads nothing
    cfg.trainer.max_steps, cfg.trainer.learning_rate, [t.weight for t in cfg.data.tasks], cfg.model_dump()
    _load_extra_commands()
    parser = build_parser()
    _trace.record_cli(parser, parser.parse_args(["compare", "c.yaml", "--n-boot", "500", "--seeds", "3"]))
    monkeypatch.setattr(_trace, "_test_here", "t.py::test_silent")
    cfg.trainer.max_steps
    now = time.time()
    (tmp_path / "results-1.tsv").write_text(f"t.py::test_reads\t1\t2\t{now:.6f}\nt.py::test_silent\t1\t0\t0\n")
    monkeypatch.setattr(coverage_trace, "TRACE_DIR", tmp_path)

    proved, unproved = coverage_trace.coverage("field")
    assert proved == {"trainer.max_steps": ["t.py::test_reads"], "data.tasks": ["t.py::test_reads"],
                      "data.tasks[].weight": ["t.py::test_reads"]}
    assert unproved == {"trainer.max_steps": ["t.py::test_silent (no passing assertion after the read)"]}
    message = coverage_trace.uncovered_message(["trainer.max_steps", "trainer.seed", "deepspeed.offload_param",
                                                "trainer.learning_rate"], "field")
    assert message.splitlines() == [f"{f}: never set to a non-default value by a test" for f in
                                    ("trainer.seed", "deepspeed.offload_param", "trainer.learning_rate")]
    flags, _ = coverage_trace.coverage("flag")
    assert flags == {"compare config": ["t.py::test_reads"], "compare --n-boot": ["t.py::test_reads"]}


def test_a_failing_test_or_an_assertion_before_the_read_proves_nothing(tmp_path, monkeypatch):
    (tmp_path / "reads-1.tsv").write_text("field\tt.py::a\tadapter.r\t100\nfield\tt.py::b\tadapter.r\t100\n"
                                          "field\tt.py::b\tadapter.r\t70\nfield\tt.py::c\tadapter.r\t100\n")
    (tmp_path / "results-1.tsv").write_text("t.py::a\t0\t3\t200\nt.py::b\t1\t1\t60\nt.py::c\t1\t1\t100\n")
    monkeypatch.setattr(coverage_trace, "TRACE_DIR", tmp_path)
    proved, unproved = coverage_trace.coverage("field")
    assert proved == {"adapter.r": ["t.py::c"]}
    assert unproved == {"adapter.r": ["t.py::a (did not pass)", "t.py::b (no passing assertion after the read)"]}


def test_the_check_judges_only_a_whole_suite(tmp_path, monkeypatch):
    monkeypatch.setattr(coverage_trace, "TRACE_DIR", tmp_path)
    (tmp_path / "session-1.json").write_text(json.dumps({"markexpr": "not slow", "complete": True}))
    assert coverage_trace.incomplete_reason() is not None  # `make test-fast`: the slow tests did not run
    (tmp_path / "session-2.json").write_text(json.dumps({"markexpr": "slow", "complete": False}))
    assert coverage_trace.incomplete_reason() is not None  # `make test ARGS=tests/x.py`
    (tmp_path / "session-2.json").write_text(json.dumps({"markexpr": "slow", "complete": True}))
    assert coverage_trace.incomplete_reason() is None  # `make test`


@pytest.mark.coverage_check
def test_every_field_is_set_read_and_asserted_on_by_a_test():
    reason = coverage_trace.incomplete_reason()
    if reason:
        pytest.skip(reason)
    message = coverage_trace.uncovered_message([f for f in schema_fields() if f not in KNOWN_GAPS], "field")
    assert not message, ("config fields that no passing test sets to a non-default value, reads and asserts on "
                         "after the read (write a test that shows the field's effect):\n" + message)
    proved, _ = coverage_trace.coverage("field")
    healed = sorted(set(KNOWN_GAPS) & set(proved))
    assert not healed, f"KNOWN_GAPS lists fields a test now proves: {healed}: remove them from KNOWN_GAPS"
