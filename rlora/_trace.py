"""Which config fields and CLI flags a run actually used, for the test suite's coverage check.

Off unless ``$RLORA_TRACE_DIR`` is set (tests/conftest.py sets it; subprocesses and Ray workers inherit it):
then :mod:`rlora.config` calls :func:`trace_config` once at import and :func:`rlora.cli.main` calls
:func:`record_cli` after parsing. Nothing else in the package refers to this module, so a normal run pays nothing.

What is recorded, once per (name, test) and process, as a line ``kind<TAB>test<TAB>name<TAB>unix time`` appended to
``$RLORA_TRACE_DIR/reads-<pid>.tsv``:

* ``field``: an attribute read of a config field (dotted as in tests/test_config_coverage.py, ``data.tasks[].weight``)
  whose value differs from the field's default (a required field always counts). Reads by the schema's own
  validators do not count (validation is not an effect), nor does serialisation (``model_dump`` reads ``__dict__``);
* ``flag``: an ``rlora`` flag or positional (``"export --format"``) parsed with a value other than its default.

The running test is the node id that the pytest process writes to ``$RLORA_TRACE_DIR/current`` before each test
(a Ray worker's environment is its raylet's, started during some earlier test, so ``$PYTEST_CURRENT_TEST`` cannot
be trusted there); with no such file nothing is recorded.
"""
from __future__ import annotations

import os
import sys
import time
import typing
from typing import Any, Optional

_DIR = os.environ.get("RLORA_TRACE_DIR") or ""
_REQUIRED = object()  # the default of a field without one: every value differs from it

_test_here: Optional[str] = None  # set in the pytest process itself (set_current_test), no file lookup there
_file_state: tuple = (None, None)  # (inode, mtime_ns) of the current-test file last read, and its text
_file_test: Optional[str] = None
_seen: set = set()


def set_current_test(nodeid: Optional[str]) -> None:
    """Called by the pytest process for each test: readers in this process need no file lookup."""
    global _test_here
    _test_here = nodeid
    if _DIR:
        tmp = os.path.join(_DIR, f".current-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(nodeid or "")
        os.replace(tmp, os.path.join(_DIR, "current"))


def current_test() -> Optional[str]:
    global _file_state, _file_test
    if _test_here is not None:
        return _test_here
    try:
        st = os.stat(os.path.join(_DIR, "current"))
    except OSError:
        return None
    key = (st.st_ino, st.st_mtime_ns)
    if key != _file_state:
        try:
            with open(os.path.join(_DIR, "current"), encoding="utf-8") as f:
                _file_test = f.read().strip() or None
        except OSError:
            return None
        _file_state = key
    return _file_test


def _record(kind: str, name: str) -> None:
    test = current_test()
    if test is None or (kind, name, test) in _seen:
        return
    _seen.add((kind, name, test))
    try:
        with open(os.path.join(_DIR, f"reads-{os.getpid()}.tsv"), "a", encoding="utf-8") as f:
            f.write(f"{kind}\t{test}\t{name}\t{time.time():.6f}\n")
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ config fields
def _models_in(annotation) -> list:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def field_names(model, prefix: str = "") -> dict[tuple[type, str], str]:
    """(model class, field) -> dotted knob name for every knob under ``model`` (sections are walked, not knobs)."""
    from pydantic import BaseModel

    out: dict[tuple[type, str], str] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(field_names(ann, f"{prefix}{name}."))
            continue
        out[(model, name)] = prefix + name
        for item in _models_in(ann):
            out.update(field_names(item, f"{prefix}{name}[]."))
    return out


def _validator_codes(models) -> set:
    codes = set()
    for m in models:
        decos = m.__pydantic_decorators__
        for group in (decos.field_validators, decos.model_validators):
            for d in group.values():
                fn = getattr(d.func, "__func__", d.func)
                if hasattr(fn, "__code__"):
                    codes.add(fn.__code__)
    return codes


def trace_config(section: type, root: type) -> None:
    """Make every attribute read of a knob of ``root`` (a subclass of ``section``) with a non-default value
    record itself. Installs ``section.__getattribute__``; the per-read cost is one dict lookup unless the value
    differs from the default."""
    names = field_names(root)
    per_class: dict[type, dict[str, tuple[str, Any]]] = {}
    for (cls, name), dotted in names.items():
        f = cls.model_fields[name]
        if f.default_factory is not None:
            default = f.default_factory()
        elif f.is_required():
            default = _REQUIRED
        else:
            default = f.default
        per_class.setdefault(cls, {})[name] = (dotted, default)
    skip = _validator_codes(per_class)
    get, empty = object.__getattribute__, {}

    def __getattribute__(self, name: str):
        value = get(self, name)
        entry = per_class.get(type(self), empty).get(name)
        if entry is not None and (entry[1] is _REQUIRED or value != entry[1]):
            if sys._getframe(1).f_code not in skip:
                _record("field", entry[0])
        return value

    section.__getattribute__ = __getattribute__


# ------------------------------------------------------------------------------------------------ CLI flags
def _flag_name(action) -> str:
    return max(action.option_strings, key=len) if action.option_strings else action.dest


def _differs(value, default) -> bool:
    if value in (None, [], False) and default in (None, [], False):
        return False
    return value != default


def record_cli(parser, args, debug: bool = False) -> None:
    """Record every flag and positional of the chosen (sub-)command that was given a non-default value."""
    import argparse

    if debug:
        _record("flag", "--debug")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            command = getattr(args, action.dest, None)
            sub = action.choices.get(command) if command else None
            if sub is None:
                continue
            for a in sub._actions:
                if isinstance(a, argparse._HelpAction) or a.dest == argparse.SUPPRESS:
                    continue
                if _differs(getattr(args, a.dest, None), a.default):
                    _record("flag", f"{command} {_flag_name(a)}")
        elif not isinstance(action, argparse._HelpAction) and action.option_strings:
            if _differs(getattr(args, action.dest, None), action.default):
                _record("flag", _flag_name(action))
