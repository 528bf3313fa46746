"""Align-LoRA in `rlora compare`: it is LoRA plus a loss, so it trains at LoRA's budget rank (and scaling); its
``align_lambda`` is in its cells' keys and in no other method's (their finished cells keep their keys)."""
import json
import subprocess
import sys

import pytest
import yaml

from helpers import run_config
from rlora.compare.budget import lora_rank
from rlora.compare.cli import _names
from rlora.compare.grid import METHODS, cell_key, plan


def test_align_cells_train_at_lora_s_budget_rank(tiny_model_dir, task_dir, tmp_path):
    cfg = run_config(tiny_model_dir, task_dir, tmp_path, adapter__r=4, adapter__num_heads=2, adapter__alpha=8,
                     adapter__tasks=["parity", "sign", "size"])
    assert _names("lora,align", METHODS, "--methods") == ["lora", "align"]
    cells = {c.method: c for c in plan(cfg, [("lora", "proportional"), ("align", "proportional"),
                                             ("hydra", "proportional")], 1, "ab", tmp_path)}
    rank = lora_rank(cfg, ["hydra", "rlora", "mtl"], "ab")
    assert rank == 6 != cfg.adapter.r                        # round(2304 / 416), tests/compare/test_budget.py
    for m in ("lora", "align"):
        assert (cells[m].cfg.adapter.r, cells[m].cfg.adapter.alpha) == (rank, 8 * rank / 4), m
        assert cells[m].params["ab"] == cells["lora"].params["ab"] == rank * 416
    assert cells["hydra"].cfg.adapter.r == 4
    assert cells["align"].key != cells["lora"].key


def test_align_lambda_is_in_align_s_cell_keys_only(tiny_model_dir, task_dir, tmp_path):
    def key(method, **kw):
        return cell_key(run_config(tiny_model_dir, task_dir, tmp_path, adapter__method=method, **kw))

    assert key("align", adapter__align_lambda=0.5) != key("align")
    for m in ("lora", "hydra", "rlora", "mtl"):
        assert key(m, adapter__align_lambda=0.5) == key(m), m


@pytest.mark.slow
def test_compare_lora_and_align_end_to_end(tiny_model_dir, task_dir, tmp_path):
    """`rlora compare --methods lora,align --local`: both cells train through the loop, align at LoRA's rank, and
    the report pairs align against lora."""
    cfg = run_config(tiny_model_dir, task_dir, tmp_path, trainer__max_steps=3, trainer__save_steps=3,
                     eval__max_examples_per_task=4, diagnostics__enabled=False, mlflow__enabled=False,
                     ray__num_workers=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "rlora.cli", "compare", str(path), "--out", str(out), "--local",
                           "--methods", "lora,align", "--seeds", "1", "--n-boot", "100"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["method"]: r for r in (json.loads(p.read_text()) for p in (out / "cells").glob("*.json"))}
    assert set(recs) == {"lora", "align"}
    assert recs["align"]["rank"] == recs["lora"]["rank"] == 6
    assert recs["align"]["data_order"] == recs["lora"]["data_order"]
    report = json.loads((out / "compare.json").read_text())
    assert [c["label"] for c in report["comparisons"]] == ["align vs lora (proportional)"] * len(report["comparisons"])
