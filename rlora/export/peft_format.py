"""Write folded low-rank updates as a standard PEFT LoRA adapter directory.

Files: ``adapter_config.json`` (``peft_type: LORA``) and ``adapter_model.safetensors`` with PEFT's key
names ``base_model.model.<module>.lora_A.weight`` [r', d_in] and ``...lora_B.weight`` [d_out, r'].

PEFT and vLLM compute ``W0 x + (lora_alpha / r') · B' A' x`` (``lora_alpha / sqrt(r')`` with ``use_rslora``);
SGLang always ``lora_alpha / r'`` (it ignores ``use_rslora``). So the config never sets ``use_rslora``: the
adapter's scaling ``s`` (``alpha / r`` or, trained with rsLoRA, ``alpha / sqrt(r)``) is written as
``lora_alpha = s · r'`` with ``use_rslora: false``, and every engine computes the same update.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from ..config import AdapterConfig
from .errors import ExportError
from .fold import LowRank

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def peft_state_dict(folds: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    state = {}
    for name, f in folds.items():
        state[f"base_model.model.{name}.lora_A.weight"] = f.A.detach().float().contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = f.B.detach().float().contiguous().cpu()
    return state


def peft_config(cfg: AdapterConfig, folds: dict[str, LowRank], base_model: str,
                revision: Optional[str] = None) -> dict:
    """PEFT's ``adapter_config.json`` for ``folds`` (one rank and one scaling for every layer)."""
    ranks = {f.rank for f in folds.values()}
    scalings = {round(f.scaling, 12) for f in folds.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ExportError(f"folded layers disagree in rank {sorted(ranks)} or scaling {sorted(scalings)}: "
                          "cannot write one PEFT config")
    rank, scaling = ranks.pop(), next(iter(folds.values())).scaling
    modules = sorted({name.rsplit(".", 1)[-1] for name in folds})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": rank,
        "lora_alpha": scaling * rank,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def write_peft(folder: Path, cfg: AdapterConfig, folds: dict[str, LowRank], base_model: str,
               on_file: Optional[Callable[[str], None]] = None, revision: Optional[str] = None) -> None:
    """Write the PEFT adapter files into ``folder`` (``on_file(name)`` is called after each file)."""
    if not folds:
        raise ExportError("the adapter has no layers to export")
    config = peft_config(cfg, folds, base_model, revision)
    save_file(peft_state_dict(folds), str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    if on_file:
        on_file(PEFT_WEIGHTS)
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if on_file:
        on_file(PEFT_CONFIG)
