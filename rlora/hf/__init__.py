"""rlora for Hugging Face Trainer / TRL / PEFT users: ``get_adapter_model`` and ``AdapterModel``."""
from .fingerprint import base_fingerprint
from .model import AdapterModel, get_adapter_model

__all__ = ["AdapterModel", "get_adapter_model", "base_fingerprint"]
