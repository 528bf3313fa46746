"""The cells of a comparison: one run config per (method, sampler, seed), at equal budgets.

Within a seed every cell has the same ``trainer.seed``, data, sampler settings and dev rows, so the
cells of one seed see the same data order (a static sampler draws from ``(seed, step)`` only; the
training loop records the order's digest, which the runner checks) and are scored on the same rows:
differences between methods are paired. A cell's key is a hash of its whole config (the seed
included; the run name, output folder and MLflow parent left out), so a re-run finds the cells it
already finished.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from .budget import Budget, lora_rank, parameter_counts

METHODS = ("lora", "hydra", "rlora", "mtl")


@dataclass
class Cell:
    method: str
    sampler: str
    seed: int
    cfg: RunConfig
    key: str
    params: dict

    @property
    def label(self) -> str:
        return f"{self.method}/{self.sampler}/seed {self.seed}"


def cell_key(cfg: RunConfig) -> str:
    d = cfg.model_dump(mode="json")
    d["trainer"].pop("run_name", None)
    d["trainer"].pop("output_dir", None)
    d["mlflow"].pop("parent_run_id", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def plan(cfg: RunConfig, arms: list[tuple[str, str]], seeds: int, budget: Budget, out_dir: Path) -> list[Cell]:
    """A cell per (method, sampler) arm and seed; seeds are ``trainer.seed + 0 .. seeds - 1``. LoRA gets the
    rank of the equal ``budget`` against the multi-head methods (all three, so that a LoRA cell is the same
    in every grid of a config) and keeps their scaling (``alpha`` scaled with its rank)."""
    rank = lora_rank(cfg, [m for m in METHODS if m != "lora"], budget)
    cells = []
    for i in range(seeds):
        for method, sampler in arms:
            c = cfg.model_copy(deep=True)
            c.adapter.method = method
            if method == "lora" and rank != cfg.adapter.r:
                ratio = rank / cfg.adapter.r
                c.adapter.alpha = cfg.adapter.alpha * (ratio ** 0.5 if cfg.adapter.rslora else ratio)
                c.adapter.r = rank
            c.sampler.strategy = sampler
            c.trainer.seed = cfg.trainer.seed + i
            c.trainer.output_dir = str(out_dir / "runs")
            key = cell_key(c)
            c.trainer.run_name = f"cmp-{method}-{sampler}-s{c.trainer.seed}-{key[:6]}"
            cells.append(Cell(method, sampler, c.trainer.seed, c, key, parameter_counts(c)))
    return cells
