"""Functions that ``make mutate`` cannot mutate: mutmut (3.8) skips every decorated function except one with a
single bare ``@staticmethod`` or ``@classmethod``, and only mutates module-level functions and the methods of
module-level classes (code in a nested class, or under a module-level ``if``/``try``/``with``, gets no mutants).
A function listed here makes no mutants, so it is missing from the kill rates in the reports.

Usage: ``python tests/mutations/unmutated.py [FILE ...]`` (default: the files of every group in mutate.py);
prints ``file:line name: reason`` for each such function and the number of mutants mutmut makes per file
(with mutmut's own code, so the numbers match ``mutmut run``); exit code 1 when any function is listed.
"""
from __future__ import annotations

import ast
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ("staticmethod", "classmethod")


def _reason(fn: ast.FunctionDef | ast.AsyncFunctionDef, top: bool) -> str | None:
    decs = fn.decorator_list
    if decs and not (len(decs) == 1 and isinstance(decs[0], ast.Name) and decs[0].id in ALLOWED):
        return "decorated " + ", ".join("@" + ast.unparse(d) for d in decs)
    return None if top else "not a module-level function or a method of a module-level class"


def unmutated(source: str) -> list[tuple[int, str, str]]:
    """(line, qualified name, reason) of every function of ``source`` that mutmut leaves unmutated."""
    out = []

    def walk(body: list[ast.stmt], prefix: str, top: bool, in_class: bool) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                why = _reason(node, top)
                if why:
                    out.append((node.lineno, prefix + node.name, why))
                # nested functions are mutated with the function around them (or not at all)
            elif isinstance(node, ast.ClassDef):
                walk(node.body, prefix + node.name + ".", top and not in_class and not prefix, True)
            elif isinstance(node, (ast.If, ast.Try, ast.With)) and not in_class:
                walk(node.body + getattr(node, "orelse", []), prefix, False, in_class)

    walk(ast.parse(source).body, "", True, False)
    return out


def mutant_count(path: Path) -> int:
    """The number of mutations mutmut makes in ``path`` (its config needs a setup.cfg: a throwaway one)."""
    import libcst
    from mutmut.mutation.file_mutation import create_mutations

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "setup.cfg").write_text(f"[mutmut]\nsource_paths = {ROOT / 'rlora'}\n")
        os.chdir(tmp)
        try:
            mutations = create_mutations(str(path), path.read_text())[1]
        finally:
            os.chdir(here)
    # mutmut keeps only the mutations inside a function or method (module and class-body statements: none)
    return sum(isinstance(m.contained_by_top_level_function, libcst.FunctionDef) for m in mutations)


def main(argv: list[str]) -> int:
    if argv:
        files = [Path(a).resolve() for a in argv]
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from mutate import GROUPS
        files = sorted({p for fs, _ in GROUPS.values() for pat in fs for p in ROOT.glob(pat)})
    found = 0
    for f in files:
        rel = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
        for line, name, why in unmutated(f.read_text()):
            print(f"{rel}:{line} {name}: {why}")
            found += 1
        print(f"{rel}: {mutant_count(f)} mutants")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
