"""Fold a multi-head adapter, for one task, into one plain low-rank update per layer.

Every layer becomes ``h = W0 x + s · B' A' x`` (PEFT's LoRA form) with ``A' [r', d_in]``, ``B' [d_out, r']``
and the adapter's scaling ``s``:

* ``lora``:  A' = A, B' = B_1 (exact, r' = r);
* ``mtl``:   A' = Λ_t A, B' = Σ_i softmax(w_t/τ)_i B_i (exact, r' = r);
* ``hydra``: the per-token router ``g(x)`` cannot be folded exactly; it is replaced by the task's
  average gates ḡ (the router softmax averaged over the tokens of the task's dev rows, per layer):
  Σ_i ḡ_i B_i A x = [ḡ_1 B_1 … ḡ_N B_N] [A; …; A] x, and since A is shared by the heads this rank-N·r
  block form equals the rank-r product B' = Σ_i ḡ_i B_i, A' = A, which is what is written;
* ``rlora``: as hydra, plus the frozen offset −s B̄⁰ A⁰: B' = [Σ_i ḡ_i B_i, −B̄⁰], A' = [A; A⁰] (r' = 2r).

The approximation error of the average-gate fold is measured on the task's dev rows as the relative
logit error ``‖logits_folded − logits_adapter‖_F / ‖logits_adapter‖_F`` over the non-padding positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..config import AdapterConfig
from ..context import task_ids
from ..inject import adapter_layers, merge, unmerge
from ..layers import HydraLoRALinear, LoRALinear, MTLLoRALinear, MultiHeadLoRALinear, RLoRALinear
from .errors import ExportError

EXACT_METHODS = ("lora", "mtl")
ROUTED_METHODS = ("hydra", "rlora")


@dataclass
class LowRank:
    """One layer's update ``ΔW = scaling · B @ A`` with A [r, d_in] and B [d_out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)


# ----------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------
def task_index(cfg: AdapterConfig, task: Optional[str]) -> Optional[int]:
    """The task id of ``task`` (None for lora, where the task is ignored, and for routed adapters that
    recorded no task list). Unknown or missing tasks raise a one-line :class:`ExportError`."""
    if cfg.method == "lora":
        return None
    if task is None:
        listed = f": one of {cfg.tasks}" if cfg.tasks else ""
        raise ExportError(f"--task is required for a {cfg.method} adapter{listed}")
    if not cfg.tasks:
        if cfg.method == "mtl":
            raise ExportError("the mtl adapter records no tasks in adapter_config.json: re-save it with adapter.tasks set")
        return None
    if task not in cfg.tasks:
        raise ExportError(f"unknown task {task!r}: the adapter's tasks are {cfg.tasks}")
    return cfg.tasks.index(task)


# ----------------------------------------------------------------------------------------------
# folding
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_layer(layer: MultiHeadLoRALinear, task: Optional[int] = None,
               gates: Optional[torch.Tensor] = None) -> LowRank:
    """The plain low-rank form of one layer for ``task`` (mtl) or with average ``gates`` [N] (hydra, rlora)."""
    A = layer.lora_A.detach().float()
    B = layer.lora_B.detach().float()                                     # [d_out, N, r]
    if isinstance(layer, MTLLoRALinear):
        if task is None:
            raise ExportError("folding an MTL-LoRA layer needs a task: pass --task")
        m = layer.mixing()[task].float()                                  # [n]
        return LowRank(layer.lambdas()[task].float() @ A, torch.einsum("n,onr->or", m, B), layer.scaling)
    if isinstance(layer, HydraLoRALinear):
        if gates is None:
            raise ExportError(f"folding a {layer.method} layer needs its average gates: pass --data with the task's dev rows")
        g = gates.float().to(B.device)
        if g.shape != (layer.num_heads,):
            raise ExportError(f"average gates have shape {tuple(g.shape)}, expected ({layer.num_heads},)")
        A2, B2 = A, torch.einsum("n,onr->or", g, B)
        if isinstance(layer, RLoRALinear) and layer.use_offset:
            A2 = torch.cat([A2, layer.offset_A.detach().float()], dim=0)
            B2 = torch.cat([B2, -layer.offset_B.detach().float()], dim=1)
        return LowRank(A2, B2, layer.scaling)
    if isinstance(layer, LoRALinear):
        return LowRank(A, B[:, 0], layer.scaling)
    raise ExportError(f"cannot fold a {type(layer).__name__} layer")


def fold_adapter(model: nn.Module, task: Optional[int] = None,
                 gates: Optional[dict[str, torch.Tensor]] = None) -> dict[str, LowRank]:
    """``module name -> LowRank`` for every adapter layer of ``model``."""
    out = {}
    for name, layer in adapter_layers(model):
        out[name] = fold_layer(layer, task, None if gates is None else gates.get(name))
    return out


@torch.no_grad()
def folded_weights(model: nn.Module, method: str, task: Optional[int],
                   folds: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """``module name -> W0 + ΔW`` for every adapter layer: exact (``rlora.merge``) for lora/mtl, the
    average-gate fold for hydra/rlora."""
    weights: dict[str, torch.Tensor] = {}
    if method in EXACT_METHODS:
        merge(model, task)
        try:
            for name, layer in adapter_layers(model):
                weights[name] = layer.base.weight.detach().clone()
        finally:
            unmerge(model)
        return weights
    for name, layer in adapter_layers(model):
        w = layer.base.weight.detach()
        weights[name] = (w.float() + folds[name].delta().to(w.device)).to(w.dtype)
    return weights


@torch.no_grad()
def apply_weights(plain: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Copy folded weights into a plain (adapter-free) copy of the base model."""
    for name, w in weights.items():
        try:
            lin = plain.get_submodule(name)
        except AttributeError:
            raise ExportError(f"the base model has no module {name}: pass the --base-model the adapter was trained on") from None
        if not isinstance(lin, nn.Linear) or lin.weight.shape != w.shape:
            raise ExportError(f"module {name} of the base model does not fit the adapter: pass the --base-model "
                              "the adapter was trained on")
        lin.weight.copy_(w.to(lin.weight.dtype))
    return plain


# ----------------------------------------------------------------------------------------------
# dev rows -> token batches
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenBatch:
    input_ids: torch.Tensor        # [b, L] right-padded
    attention_mask: torch.Tensor   # [b, L] 1 on real tokens


def token_batches(tokenizer, examples: Sequence, max_length: int = 256, batch_size: int = 4,
                  use_chat_template: bool = True) -> list[TokenBatch]:
    """Prompt + answer + eos token ids of each row (as in training), right-padded into batches."""
    from ..data.tokenization import encode_example

    seqs = [encode_example(tokenizer, ex, max_length, use_chat_template)["input_ids"] for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for i in range(0, len(seqs), batch_size):
        group = seqs[i:i + batch_size]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for b, s in enumerate(group):
            ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, :len(s)] = 1
        batches.append(TokenBatch(ids, mask))
    return batches


def load_dev_examples(data: Path, task: str, max_examples: int) -> list:
    """The first ``max_examples`` rows of ``<data>/<task>/dev.jsonl`` (the interchange format)."""
    from ..data import read_task_dir

    folder = Path(data).expanduser() / task
    if not folder.is_dir():
        have = sorted(p.name for p in Path(data).expanduser().iterdir() if p.is_dir()) if Path(data).expanduser().is_dir() else []
        raise ExportError(f"--data {data} has no folder for task {task!r} (folders: {have}): pass the run's data "
                          "directory (one folder per task)")
    if max_examples < 1:
        raise ExportError(f"--max-examples must be >= 1, got {max_examples}")
    return read_task_dir(folder, "dev", task=task)[:max_examples]


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _routing(task: Optional[int], batch: int):
    import contextlib

    return contextlib.nullcontext() if task is None else task_ids(torch.full((batch,), task, dtype=torch.long))


@torch.no_grad()
def average_gates(model: nn.Module, batches: Sequence[TokenBatch]) -> tuple[dict[str, torch.Tensor], int]:
    """Per routed layer, the router softmax averaged over every real token of ``batches``:
    ``ḡ = (1/T) Σ_tokens softmax(W_r x)`` [N]. Returns (``name -> ḡ``, T)."""
    layers = [(n, l) for n, l in adapter_layers(model) if isinstance(l, HydraLoRALinear)]
    sums = {n: torch.zeros(l.num_heads, dtype=torch.float64) for n, l in layers}
    state: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str):
        def hook(mod, args):
            x = args[0]
            g = mod.gates(x.reshape(-1, mod.d_in))                             # [b*L, N] fp32
            w = state["mask"].reshape(-1, 1).to(g.dtype)
            sums[name] += (g * w).sum(0).double().cpu()
        return hook

    for n, l in layers:
        handles.append(l.register_forward_pre_hook(hook_for(n)))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        dev = _device(model)
        for b in batches:
            state["mask"] = b.attention_mask.to(dev)
            model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev), use_cache=False)
            tokens += int(b.attention_mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise ExportError("the dev rows hold no tokens: cannot measure the average gates")
    return {n: (s / tokens).float() for n, s in sums.items()}, tokens


@torch.no_grad()
def relative_logit_error(adapter_model: nn.Module, plain_model: nn.Module, batches: Sequence[TokenBatch],
                         task: Optional[int] = None) -> float:
    """``‖logits_plain − logits_adapter‖_F / ‖logits_adapter‖_F`` over the real tokens of ``batches``."""
    num = den = 0.0
    dev_a, dev_p = _device(adapter_model), _device(plain_model)
    for b in batches:
        m = b.attention_mask.bool()
        with _routing(task, b.input_ids.shape[0]):
            la = adapter_model(input_ids=b.input_ids.to(dev_a), attention_mask=b.attention_mask.to(dev_a),
                               use_cache=False).logits[m.to(dev_a)].double()
        lp = plain_model(input_ids=b.input_ids.to(dev_p), attention_mask=b.attention_mask.to(dev_p),
                         use_cache=False).logits[m.to(dev_p)].double().to(la.device)
        num += float(((lp - la) ** 2).sum())
        den += float((la ** 2).sum())
    if den == 0.0:
        raise ExportError("the dev rows hold no tokens: cannot measure the logit error")
    return math.sqrt(num / den)


def iter_layer_gates(gates: dict[str, torch.Tensor]) -> Iterator[tuple[str, list[float]]]:
    for name, g in gates.items():
        yield name, [round(float(v), 6) for v in g]
