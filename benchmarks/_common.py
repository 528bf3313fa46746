"""Shared helpers for the benchmark scripts: interleaved A/B rounds, median and spread, the --json last line.

Every timing figure is measured in ``R`` rounds. Inside a round each contender runs once (or a few
times, interleaved call by call), so machine noise hits all of them alike; a ratio is formed *within*
each round, giving ``R`` values ``v_1..v_R``. A figure reports

    value  = median(v_1..v_R)
    spread = (max(v) - min(v)) / 2           (value ± spread covers every round)

and ``rounds = R``. The ``--json`` last line is::

    {"benchmark": NAME, "figures": {FIGURE: {"value", "spread", "target", "unit", "rounds"}}}

``spread`` is 0 for exact (deterministic) figures and ``null`` for a figure from a single measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Optional, Sequence, Union


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


# ---- measuring ----------------------------------------------------------------------------------
def interleaved_rounds(fns: dict[str, Callable[[], None]], rounds: int, per_round: int,
                       warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each fn, one value per round: the median of ``per_round`` calls, the calls of
    all fns interleaved round-robin (A B C A B C ...) so that noise hits every fn alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(per_round):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        for k, v in times.items():
            out[k].append(statistics.median(v))
    return out


def interleaved_median(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn over ``repeats`` interleaved calls (one round)."""
    return {k: v[0] for k, v in interleaved_rounds(fns, 1, repeats, warmup).items()}


# ---- summarising --------------------------------------------------------------------------------
def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios num_k / den_k (both lists from the same rounds)."""
    if len(num) != len(den):
        raise ValueError(f"ratios of {len(num)} and {len(den)} rounds: measure both in the same rounds")
    return [a / b for a, b in zip(num, den)]


def median_spread(values: Union[float, Sequence[float]]) -> tuple[float, Optional[float], int]:
    """(median, half-range, rounds) of per-round values; a single number has spread ``None``."""
    if isinstance(values, (int, float)):
        return float(values), None, 1
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no rounds to summarise")
    return statistics.median(vals), (max(vals) - min(vals)) / 2, len(vals)


def figure(values: Union[float, Sequence[float]], target: str, unit: str = "x", spread: Optional[float] = None,
           digits: int = 4) -> dict:
    """A figure from per-round values (median and half-range) or from one number (``spread`` as given:
    0 for an exact figure, ``None`` when unmeasured)."""
    value, sp, n = median_spread(values)
    if sp is None:
        sp = spread
    return {"value": _round(value, digits), "spread": None if sp is None else _round(sp, digits),
            "target": target, "unit": unit, "rounds": n}


def _round(v: float, digits: int) -> float:
    """``digits`` decimals, or ``digits`` significant digits below 1 (so that 3e-7 stays 3e-7)."""
    v = float(v)
    return float(f"{v:.{digits}g}") if abs(v) < 1 else round(v, digits)


def show(values: Union[float, Sequence[float]], fmt: str = ".3f", unit: str = "x") -> str:
    """``1.234x ± 0.012 (3 rounds)`` for printing."""
    value, sp, n = median_spread(values)
    if sp is None:
        return f"{value:{fmt}}{unit}"
    return f"{value:{fmt}}{unit} ± {sp:{fmt}} ({n} rounds)"


def meets(value: float, target: str) -> Optional[bool]:
    """Whether ``value`` meets a target written as ``<=1.2``, ``>=0.9``, ``<1``, ``>1`` or ``==1``; None for
    others (``info``)."""
    for op in ("<=", ">=", "==", "<", ">"):
        if target.startswith(op):
            try:
                bound = float(target[len(op):])
            except ValueError:
                return None
            return {"<=": value <= bound, ">=": value >= bound, "==": value == bound, "<": value < bound,
                    ">": value > bound}[op]
    return None


def emit(name: str, figures: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"benchmark": name, "figures": figures}), flush=True)
