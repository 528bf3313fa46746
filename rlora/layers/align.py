"""Align-LoRA (arXiv 2508.05078): plain LoRA in the forward; an alignment loss in training."""
from __future__ import annotations

import torch
from torch import nn

from ..alignment import active_recorder
from ..config import AdapterConfig
from .lora import LoRALinear


class AlignLoRALinear(LoRALinear):
    """``h = W0 x + s · B A drop(x)``, exactly :class:`LoRALinear` (same parameters, initialisation and
    arithmetic), so it merges and exports as a plain LoRA and costs nothing at inference.

    While :func:`rlora.alignment.record_alignment` is open (the training loop's forward), the rank-space
    features u = s · A drop(x) [T, r] that feed B are handed to the recorder, which turns them into the
    alignment loss (:mod:`rlora.alignment`); handing them over adds no operation to the forward.
    ``align_memory`` holds the most recent detached Gaussian fit (μ, σ²) of each task seen by this layer
    (task id -> ([r], [r])), used when a micro-batch holds a single task."""

    method = "align"

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, num_tasks: int = 0):
        super().__init__(base, cfg, num_tasks)
        self.align_memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rank_features(self, x: torch.Tensor) -> torch.Tensor:
        u = super().rank_features(x)
        recorder = active_recorder()
        if recorder is not None:
            recorder.add(self, u)
        return u
