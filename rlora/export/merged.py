"""Write a Hugging Face model directory whose linear weights hold the folded update ``W0 + ΔW``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch import nn


def write_merged(folder: Path, plain: nn.Module, tokenizer, on_file: Optional[Callable[[str], None]] = None) -> None:
    """``save_pretrained`` of the merged model (safetensors + config) and of the tokenizer into ``folder``.

    A base model dequantized from GGUF can still carry quantizer attributes that make
    ``save_pretrained`` refuse; they are stripped first (the weights are plain floats)."""
    from ..models import _strip_quantizer

    _strip_quantizer(plain)
    plain.save_pretrained(str(folder))
    if on_file:
        on_file("model.safetensors")
    tokenizer.save_pretrained(str(folder))
    if on_file:
        on_file("tokenizer")
