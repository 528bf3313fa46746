"""Equal parameter budgets for the methods of a comparison.

For a module ``d_in -> d_out``, LoRA of rank R trains ``R (d_in + d_out)`` parameters; a multi-head
adapter of rank r with N heads trains ``r (d_in + N d_out)`` in its shared A and heads B, plus its own
extras: a router (``N d_in``, hydra and rlora) or task terms (``T r^2 + T N``, mtl; ``T r + T N``
diagonal). Over all adapted modules:

* ``ab``: LoRA's rank matches the shared A + B: ``R = round(r sum(d_in + N d_out) / sum(d_in + d_out))``
  (= (N + 1) r / 2 for square modules); routers and task terms come on top.
* ``total``: LoRA's rank is the smallest whose parameters reach *all* trainable parameters of the largest
  multi-head method (hydra, rlora, mtl; rounded up), so LoRA never trains fewer parameters than a method it is
  compared with.

The counts come from the real injection on a meta-device copy of the base model (no memory).
"""
from __future__ import annotations

from typing import Literal

from ..config import SINGLE_HEAD_METHODS, RunConfig

Budget = Literal["ab", "total"]


def _skeleton(cfg: RunConfig):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)[0]
    mcfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)


def parameter_counts(cfg: RunConfig) -> dict[str, int]:
    """``{"ab": shared A + B, "total": all trainable}`` of ``cfg.adapter`` on ``cfg.model``."""
    from ..inject import adapter_layers, count_parameters, inject

    model = _skeleton(cfg)
    inject(model, cfg.adapter)
    ab = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in adapter_layers(model))
    return {"ab": ab, "total": count_parameters(model)[0]}


def lora_rank(cfg: RunConfig, methods: list[str], budget: Budget) -> int:
    """LoRA's rank for an equal ``budget`` against the multi-head ``methods`` at ``cfg.adapter``'s r, N."""
    heads = [m for m in methods if m not in SINGLE_HEAD_METHODS]
    if not heads:
        return cfg.adapter.r
    one = cfg.model_copy(deep=True)
    one.adapter.method, one.adapter.r = "lora", 1
    per_rank = parameter_counts(one)["ab"]  # sum(d_in + d_out)
    target = 0
    for m in heads:
        c = cfg.model_copy(deep=True)
        c.adapter.method = m
        target = max(target, parameter_counts(c)[budget])
    if budget == "total":  # never fewer trainable parameters than the largest method
        return max(1, -(-target // per_rank))
    return max(1, round(target / per_rank))
