"""The base model's zero-shot dev results, cached by fingerprint.

Every method starts exactly at the base model (zero up-projections, or R-LoRA's zero-start offset), so
the "before training" evaluation depends only on the base model, the tokenizer, the dev rows and the
evaluation settings -- not on the method, the sampler or the seed. Its result is kept under
``$RLORA_CACHE/zero_shot/<fingerprint>.json`` and reused by every later run with the same fingerprint:

    sha256 of: the model folder's files (names, sizes, the bytes of its *.json, the modification time of
    the others: weights rewritten in place are a new model), the model dtype,
    every dev row evaluated (task, id, input, options, target), the prompt settings (max_length,
    chat template, templates), eval.length_normalized, eval.split, and the torch version.

A run whose adapter does not start at the base model (R-LoRA with ``zero_start_offset: false``) is
never cached. Rank 0 decides and every rank gets its answer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..config import RunConfig

VERSION = 1


def starts_at_base(cfg: RunConfig) -> bool:
    return not (cfg.adapter.method == "rlora" and not cfg.adapter.zero_start_offset)


def _model_identity(name_or_path: str) -> list:
    from ..models import resolve_model_path

    folder = Path(resolve_model_path(name_or_path)[0])
    if not folder.is_dir():
        return [name_or_path]  # a hub id: its revision is not known here
    files = []
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            digest = hashlib.sha256(f.read_bytes()).hexdigest() if f.suffix == ".json" else st.st_mtime_ns
            files.append([f.name, st.st_size, digest])
    return files


def fingerprint(cfg: RunConfig, dev: dict) -> str:
    from ..data import prompt_templates

    n = cfg.eval.max_examples_per_task
    rows = {t: [dataclasses.asdict(e) for e in (ex if n is None else ex[:n])] for t, ex in dev.items()}
    blob = {"version": VERSION, "model": _model_identity(cfg.model.name_or_path), "dtype": cfg.model.torch_dtype,
            "rows": rows, "max_length": cfg.data.max_length, "chat": cfg.data.use_chat_template,
            "templates": prompt_templates(cfg.data), "length_normalized": cfg.eval.length_normalized,
            "split": cfg.eval.split, "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_file(key: str) -> Path:
    from ..models import cache_root

    return cache_root() / "zero_shot" / f"{key}.json"


def load(key: str) -> Optional[dict]:
    f = cache_file(key)
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # a damaged entry is recomputed and rewritten


def store(key: str, results: dict) -> None:
    f = cache_file(key)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results))
    os.replace(tmp, f)
