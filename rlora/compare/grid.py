"""The cells of a comparison: one run config per (method, sampler, seed), at equal budgets.

Within a seed every cell has the same ``trainer.seed``, data, sampler settings and dev rows, so the
cells of one seed see the same data order (a static sampler draws from ``(seed, step)`` only; the
training loop records the order's digest, which the runner checks) and are scored on the same rows:
differences between methods are paired. A cell's key is a hash of everything that changes its result:
the config with the seed, and the *contents* of its data files in place of their paths. Where things
are (data folder, output folder, Ray address and storage, MLflow) and how the run is logged are left
out, so a re-run finds the cells it already finished, and a results folder copied to another machine
or clone resumes there.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import SINGLE_HEAD_METHODS, RunConfig
from .budget import Budget, lora_rank, parameter_counts

METHODS = ("lora", "hydra", "rlora", "mtl", "align")


@dataclass
class Cell:
    method: str
    sampler: str
    seed: int
    cfg: RunConfig
    key: str
    params: dict
    overrides: tuple = ()   # the arm's dotted overrides (its --tune pick)

    @property
    def label(self) -> str:
        return f"{self.method}/{self.sampler}/seed {self.seed}"


# where a run lives and how it is logged: no effect on a cell's result
_NOT_IN_KEY = {"trainer": ("run_name", "output_dir", "logging_steps", "save_steps", "resume_from_checkpoint",
                           "fail_at_step"),
               "ray": ("address", "storage_path", "dashboard_host", "num_to_keep", "max_failures")}


def content_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of a data file or folder's files (relative names and bytes; hidden files left out)."""
    if not path or not Path(path).exists():
        return path
    root = Path(path).resolve()
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return "sha256:" + h.hexdigest()[:16]


def cell_key(cfg: RunConfig) -> str:
    d = cfg.model_dump(mode="json")
    d.pop("mlflow")
    if d["adapter"]["method"] != "align":  # only align reads it: the other methods' keys stay as they were
        d["adapter"].pop("align_lambda", None)
    for section, keys in _NOT_IN_KEY.items():
        for k in keys:
            d[section].pop(k, None)
    d["data"]["path"] = content_digest(cfg.data.path)
    for t in d["data"]["tasks"]:
        t["path"], t["hf_source"] = content_digest(t["path"]), content_digest(t["hf_source"])
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def with_overrides(cfg: RunConfig, overrides: Optional[list[str]]) -> RunConfig:
    """``cfg`` with dotted overrides applied and validated (``cfg`` itself when there are none)."""
    if not overrides:
        return cfg
    from ..config import apply_overrides, validate_config

    return validate_config(apply_overrides(cfg.model_dump(mode="json"), list(overrides)), "overrides")


def plan(cfg: RunConfig, arms: list[tuple[str, str]], seeds: int, budget: Budget, out_dir: Path,
         overrides: Optional[dict[tuple[str, str], list[str]]] = None) -> list[Cell]:
    """A cell per (method, sampler) arm and seed; seeds are ``trainer.seed + 0 .. seeds - 1``. LoRA gets the
    rank of the equal ``budget`` against the multi-head methods (all three, so that a LoRA cell is the same
    in every grid of a config) and keeps their scaling (``alpha`` scaled with its rank). ``overrides``: dotted
    overrides per arm (its tuned pick, ``--tune``), applied before its rank and key are computed."""
    overrides = overrides or {}
    ranks: dict[tuple, int] = {}
    cells = []
    for i in range(seeds):
        for method, sampler in arms:
            own = overrides.get((method, sampler))
            acfg = with_overrides(cfg, own)
            if tuple(own or ()) not in ranks:
                ranks[tuple(own or ())] = lora_rank(acfg, [m for m in METHODS if m != "lora"], budget)
            rank = ranks[tuple(own or ())]
            c = acfg.model_copy(deep=True)
            c.adapter.method = method
            if method in SINGLE_HEAD_METHODS and rank != acfg.adapter.r:  # align: LoRA plus a loss
                ratio = rank / acfg.adapter.r
                c.adapter.alpha = acfg.adapter.alpha * (ratio ** 0.5 if acfg.adapter.rslora else ratio)
                c.adapter.r = rank
            c.sampler.strategy = sampler
            c.trainer.seed = cfg.trainer.seed + i
            c.trainer.output_dir = str(out_dir / "runs")
            key = cell_key(c)
            c.trainer.run_name = f"cmp-{method}-{sampler}-s{c.trainer.seed}-{key[:6]}"
            cells.append(Cell(method, sampler, c.trainer.seed, c, key, parameter_counts(c), tuple(own or ())))
    return cells
