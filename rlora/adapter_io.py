"""Save and load adapters: ``rlora_adapter.safetensors`` + ``rlora_adapter.json``. Never unpickles.

The file names are rlora's own, not PEFT's (``adapter_model.safetensors`` + ``adapter_config.json``): a
multi-head adapter is not a PEFT LoRA adapter, and PEFT, vLLM and SGLang now find no adapter in its folder
instead of failing on a config they half understand (vLLM: "Missing required configuration fields
{'lora_alpha'}"). Folders saved before under PEFT's names (``format: rlora-adapter`` in the config) still
load. ``rlora export --format peft`` writes the PEFT adapter of one task."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .inject import adapter_config, adapter_layers, inject
from .layers import AdapterError

WEIGHTS_NAME = "rlora_adapter.safetensors"
CONFIG_NAME = "rlora_adapter.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"   # PEFT's names, used by rlora before; read, never written
LEGACY_CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
FINGERPRINT_KEY = "base_fingerprint"  # sha256 of the base weights (rlora.hf.fingerprint), where recorded


def adapter_files(path: Union[str, os.PathLike]) -> Optional[tuple[Path, Path]]:
    """``(config, weights)`` of the rlora adapter in ``path``: rlora's own names, else the legacy PEFT names
    when that config says ``format: rlora-adapter``; None when the folder holds neither."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file():
        return p / CONFIG_NAME, p / WEIGHTS_NAME
    cfg, weights = p / LEGACY_CONFIG_NAME, p / LEGACY_WEIGHTS_NAME
    if cfg.is_file() and weights.is_file():
        try:
            if json.loads(cfg.read_text()).get("format") == "rlora-adapter":
                return cfg, weights
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return cfg, weights   # read_adapter_config names the corruption
    return None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (trainable parameters and saved offsets), keyed by module path."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        for pname, t in list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False)):
            state[f"{name}.{pname}"] = t.detach()
    return state


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], state: dict | None = None,
                 extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the adapter atomically into ``path`` (created, or an existing empty directory). With
    ``overwrite`` (``save_pretrained``'s behaviour), ``path`` may be any directory: the two adapter
    files are replaced, each atomically, and everything else in it is left alone."""
    cfg = adapter_config(model)
    if cfg is None:
        raise AdapterError("model has no adapters to save: call rlora.inject first")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out} exists and is not a directory: choose a new path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise AdapterError(f"{out} exists and is not an empty directory: choose a new path")
    state = adapter_state_dict(model) if state is None else state
    if not state or any(t.numel() == 0 for t in state.values()):
        raise AdapterError("adapter state is empty (under ZeRO-3, gather the parameters before saving)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS_NAME))
        meta = {"format": "rlora-adapter", "version": FORMAT_VERSION, **cfg.model_dump(), **(extra or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if out.is_dir() and overwrite:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / name, out / name)
            tmp.rmdir()
        else:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_adapter_meta(path: Union[str, os.PathLike]) -> dict:
    """The checked contents of the adapter's config file (the config fields and what ``extra`` added)."""
    p = Path(path)
    if not p.is_dir():
        raise AdapterError(f"adapter directory {p} does not exist")
    files = adapter_files(p)
    if files is None and (p / "adapter_model.bin").exists():
        raise AdapterError(f"{p} holds a pickle (.bin) adapter: only safetensors adapters are loaded")
    if files is None and (p / LEGACY_CONFIG_NAME).is_file():
        raise AdapterError(f"{p} holds a PEFT adapter ({LEGACY_CONFIG_NAME}), not an rlora adapter: load it with peft")
    if files is None:
        raise AdapterError(f"{p} is not an rlora adapter: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg_file, _ = files
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{cfg_file} is corrupted (invalid JSON at line {err.lineno}): re-export the adapter") from None
    if meta.get("format") != "rlora-adapter":
        raise AdapterError(f"{cfg_file} is not an rlora adapter config (a PEFT adapter? load it with peft)")
    return meta


def read_adapter_config(path: Union[str, os.PathLike]) -> AdapterConfig:
    meta = read_adapter_meta(path)
    fields = {k: v for k, v in meta.items() if k in AdapterConfig.model_fields}
    return AdapterConfig.model_validate(fields)


# The settings that change what a loaded adapter computes, and the methods they apply to (None: all).
# Not compared: ``gamma`` only scales the initial A and B (and so the R-LoRA offset), all of which are
# overwritten by the loaded tensors; ``dropout`` is training noise, absent in eval.
OUTPUT_FIELDS: dict[str, Optional[tuple[str, ...]]] = {
    "method": None, "r": None, "num_heads": ("hydra", "rlora", "mtl"), "tasks": None, "alpha": None,
    "rslora": None, "target_modules": None, "temperature": ("mtl",), "diagonal": ("mtl",),
    "zero_start_offset": ("rlora",), "base_model": None,
}


def config_mismatch(have: AdapterConfig, saved: AdapterConfig) -> Optional[tuple[str, object, object]]:
    """The first setting in which ``saved`` would compute something else than ``have``:
    (field, saved value, model's value), or None when they agree."""
    for field, methods in OUTPUT_FIELDS.items():
        if methods is not None and have.method not in methods:
            continue
        a, b = getattr(saved, field), getattr(have, field)
        if field == "base_model" and (a is None or b is None):
            continue  # compared only when both sides record one
        if field == "target_modules":
            same = set(a) == set(b)
        else:
            same = a == b
        if not same:
            return field, a, b
    return None


def check_base_fingerprint(model: nn.Module, path: Path, meta: dict) -> None:
    """Refuse a base model whose weights differ from the ones the adapter was trained on."""
    saved = meta.get(FINGERPRINT_KEY)
    if saved is None:
        return
    from .hf.fingerprint import base_fingerprint

    have = base_fingerprint(model)
    if have != saved:
        name = meta.get("base_model") or f"named in its {CONFIG_NAME}"
        raise AdapterError(f"{path} was trained on other base weights (fingerprint {saved[:18]}, this model's "
                           f"{have[:18]}): load the base model it was saved from ({name}), in the same dtype")


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``: a base model gets it injected
    first; a model that already has adapters must agree on every setting in :data:`OUTPUT_FIELDS`.
    An adapter that records the fingerprint of its base weights (``save_pretrained`` writes one) is
    only loaded into a model whose base weights have that fingerprint."""
    p = Path(path)
    cfg = read_adapter_config(p)
    check_base_fingerprint(model, p, read_adapter_meta(p))
    have = adapter_config(model)
    if have is None:
        inject(model, cfg)
    elif (diff := config_mismatch(have, cfg)) is not None:
        field, saved_value, model_value = diff
        raise AdapterError(f"adapter.{field} is {saved_value!r} in {p} but {model_value!r} in the model's "
                           "adapters: load it into a fresh base model (it injects itself) or inject with the "
                           f"same adapter.{field}")
    weights_file = adapter_files(p)[1]
    try:
        saved = load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own error types on truncated files
        raise AdapterError(f"{weights_file} is truncated or corrupted ({err}): re-export the adapter") from None
    current = adapter_state_dict(model)
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise AdapterError(f"{p} does not fit this model ({what}): was it saved from another base model?")
    with torch.no_grad():
        for k, t in current.items():
            if saved[k].shape != t.shape:
                raise AdapterError(f"{p}: tensor {k} has shape {tuple(saved[k].shape)} but the model needs "
                                   f"{tuple(t.shape)}: the adapter was saved from another base model")
            t.copy_(saved[k].to(t.dtype))
    return model
