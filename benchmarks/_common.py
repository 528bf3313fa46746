"""Shared helpers for the benchmark scripts: side-by-side timing and the --json last line."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def interleaved_median(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin so that machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def figure(value: float, target: str, unit: str = "x") -> dict:
    return {"value": round(float(value), 4), "target": target, "unit": unit}


def emit(name: str, figures: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"benchmark": name, "figures": figures}))
