"""rlora: multi-task fine-tuning with multi-head LoRA (LoRA, HydraLoRA, R-LoRA, MTL-LoRA)."""
from .adapter_io import load_adapter, save_adapter
from .config import AdapterConfig, ConfigError, RunConfig, load_config
from .context import enable_gradient_checkpointing, task_ids
from .inject import adapter_layers, count_parameters, inject, merge, unmerge
from .layers import AdapterError
from .models import ModelLoadError, load_tokenizer, prepare_default_model

__version__ = "0.1.0"


def __getattr__(name: str):
    # the Hugging Face surface imports transformers' modeling code: only when it is used
    if name in ("AdapterModel", "get_adapter_model"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'rlora' has no attribute {name!r}")


def load_base_model(name_or_path: str = "smollm2-135m", **kwargs):
    """Load a base causal LM: 'smollm2-135m' (embedded), a local HF directory or a hub id."""
    from .models import load_base_model as _load

    return _load(name_or_path, **kwargs)


__all__ = ["AdapterConfig", "AdapterError", "ConfigError", "RunConfig", "load_config", "inject", "task_ids",
           "save_adapter", "load_adapter", "merge", "unmerge", "load_base_model", "adapter_layers",
           "count_parameters", "enable_gradient_checkpointing", "AdapterModel", "get_adapter_model", "ModelLoadError", "load_tokenizer", "prepare_default_model"]
