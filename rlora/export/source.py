"""Find the adapter directory behind an export SOURCE.

A SOURCE is one of

* an adapter directory (``rlora_adapter.json`` + ``rlora_adapter.safetensors``, written by
  :func:`rlora.save_adapter`; older folders under PEFT's names are read too);
* a folder holding ``adapter/``: a Ray checkpoint directory, or a training output folder
  ``<trainer.output_dir>/<run_name>``;
* a folder of Ray checkpoints ``checkpoint_*/adapter`` (the latest one is used);
* an MLflow run id (32 hex digits, or ``runs:/<id>``) whose artifact path ``adapter`` holds the adapter
  (the trainer logs it there); the tracking URI is ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

from ..adapter_io import CONFIG_NAME, WEIGHTS_NAME, adapter_files, read_adapter_config
from ..config import AdapterConfig
from ..layers import AdapterError
from .errors import ExportError

RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})/?$")
ADAPTER_ARTIFACT = "adapter"


def run_id_of(source: str) -> Optional[str]:
    """The MLflow run id if ``source`` looks like one (and is not an existing path), else None."""
    if Path(source).expanduser().exists():
        return None
    m = RUN_ID.match(str(source).strip())
    return m.group(1) if m else None


def tracking_uri_for(tracking_uri: Optional[str]) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ExportError("SOURCE is an MLflow run id but no tracking URI is set: pass --tracking-uri URI "
                          "or set MLFLOW_TRACKING_URI")
    return uri


def _is_adapter_dir(p: Path) -> bool:
    return adapter_files(p) is not None


def _checkpoint_key(p: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", p.name)
    return (int(digits[-1]) if digits else -1, p.name)


def find_adapter_dir(path: Union[str, os.PathLike]) -> Path:
    """The adapter directory inside a local SOURCE (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ExportError(f"SOURCE {path} does not exist: pass an adapter directory, a checkpoint or training "
                          "output folder holding adapter/, or an MLflow run id")
    if not p.is_dir():
        raise ExportError(f"SOURCE {path} is a file: pass the adapter directory that holds {CONFIG_NAME}")
    if _is_adapter_dir(p):
        return p
    if _is_adapter_dir(p / ADAPTER_ARTIFACT):
        return p / ADAPTER_ARTIFACT
    ckpts = sorted((c for c in p.glob("checkpoint_*") if _is_adapter_dir(c / ADAPTER_ARTIFACT)), key=_checkpoint_key)
    if ckpts:
        return ckpts[-1] / ADAPTER_ARTIFACT
    raise ExportError(f"SOURCE {path} holds no adapter ({CONFIG_NAME} + {WEIGHTS_NAME}, directly or in adapter/): "
                      "pass the adapter directory or the training output folder")


def download_run_adapter(run_id: str, tracking_uri: Optional[str], dst: Union[str, os.PathLike]) -> Path:
    """Download the ``adapter`` artifact of an MLflow run into ``dst``; returns the adapter directory."""
    import mlflow

    uri = tracking_uri_for(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ADAPTER_ARTIFACT,
                                                    dst_path=str(dst), tracking_uri=uri)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ExportError(f"could not download the adapter of MLflow run {run_id} from {uri} ({first}): check the "
                          "run id and the tracking URI, and that the run logged an 'adapter' artifact") from None
    p = Path(local)
    if not _is_adapter_dir(p):
        raise ExportError(f"MLflow run {run_id} has no adapter under its artifact path '{ADAPTER_ARTIFACT}': "
                          "was it logged with mlflow.log_artifacts=true?")
    return p


def resolve_source(source: Union[str, os.PathLike], tracking_uri: Optional[str] = None,
                   dst: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The adapter directory of ``source``. A run id is downloaded into ``dst`` (default: a new temporary
    folder that the caller owns and may delete)."""
    text = str(source)
    rid = run_id_of(text)
    if rid is None:
        adapter = find_adapter_dir(text)
    else:
        adapter = download_run_adapter(rid, tracking_uri, dst or tempfile.mkdtemp(prefix="rlora-adapter-"))
    check_adapter(adapter)
    return adapter


def check_adapter(adapter: Path) -> AdapterConfig:
    try:
        return read_adapter_config(adapter)
    except AdapterError as err:
        raise ExportError(str(err)) from None


@contextlib.contextmanager
def resolved(source: Union[str, os.PathLike], tracking_uri: Optional[str] = None) -> Iterator[Path]:
    """Like :func:`resolve_source`, removing a downloaded copy when the block ends."""
    if run_id_of(str(source)) is None:
        yield resolve_source(source, tracking_uri)
        return
    tmp = tempfile.mkdtemp(prefix="rlora-adapter-")
    try:
        yield resolve_source(source, tracking_uri, dst=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
