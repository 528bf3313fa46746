"""Fold a multi-head adapter, for one task, into one plain low-rank update per layer.

Every layer becomes ``h = W0 x + s · B' A' x`` (PEFT's LoRA form) with ``A' [r', d_in]``, ``B' [d_out, r']``
and the adapter's scaling ``s``:

* ``lora``, ``align``:  A' = A, B' = B_1 (exact, r' = r; Align-LoRA is plain LoRA in the forward);
* ``mtl``:   A' = Λ_t A, B' = Σ_i softmax(w_t/τ)_i B_i (exact, r' = r);
* ``hydra``: the per-token router ``g(x)`` cannot be folded exactly; it is replaced by the task's
  average gates ḡ (the router softmax averaged over the tokens of the task's dev rows, per layer):
  Σ_i ḡ_i B_i A x = [ḡ_1 B_1 … ḡ_N B_N] [A; …; A] x, and since A is shared by the heads this rank-N·r
  block form equals the rank-r product B' = Σ_i ḡ_i B_i, A' = A, which is what is written;
* ``rlora``: as hydra, plus the frozen offset −s B̄⁰ A⁰: ΔW = s (Σ_i ḡ_i B_i A − B̄⁰ A⁰), at most rank 2r.
  Written as the block form B = [Σ ḡ B, −B̄⁰], A = [A; A⁰] it would be two large, nearly equal terms that
  cancel (R-LoRA's heads start from a large random init that the offset removes), which a bf16 engine
  rounds before they cancel. :func:`compact` refactors it exactly into ΔW's own singular vectors instead.

The approximation error of the average-gate fold is measured on the task's dev rows as the relative
logit error ``‖logits_folded − logits_adapter‖_F / ‖logits_adapter‖_F`` over the non-padding positions,
in fp32 (the fold itself) and as a serving engine computes it in bf16 (:func:`served_model`).
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

# Functions that must not record autograd graphs open ``torch.no_grad()`` as a block rather than as a decorator:
# ``make mutate`` (mutmut) leaves decorated functions unmutated, and these are the fold's core.
EXACT_METHODS = ("lora", "mtl", "align")
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
    if cfg.method in ("lora", "align"):
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
def fold_layer(layer: MultiHeadLoRALinear, task: Optional[int] = None,
               gates: Optional[torch.Tensor] = None) -> LowRank:
    """The plain low-rank form of one layer for ``task`` (mtl) or with average ``gates`` [N] (hydra, rlora)."""
    with torch.no_grad():
        A = layer.lora_A.detach().float()
        B = layer.lora_B.detach().float()                                 # [d_out, N, r]
        if isinstance(layer, MTLLoRALinear):
            if task is None:
                raise ExportError("folding an MTL-LoRA layer needs a task: pass --task")
            m = layer.mixing()[task].float()                              # [n]
            return LowRank(layer.lambdas()[task].float() @ A, torch.einsum("n,onr->or", m, B), layer.scaling)
        if isinstance(layer, HydraLoRALinear):
            if gates is None:
                raise ExportError(f"folding a {layer.method} layer needs its average gates: pass --data with the task's "
                                  "dev rows")
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


def compact(f: LowRank, rtol: float = 1e-7) -> LowRank:
    """The same update ``ΔW = s·B A`` (A [k, d_in], B [d_out, k]) in balanced factors of its numerical rank.

    With B = Q_b R_b and Aᵀ = Q_a R_a (thin QR, fp64) and the SVD of the k×k core R_b R_aᵀ = U Σ Vᵀ:
    ``B A = (Q_b U) Σ (Q_a V)ᵀ``, written as B'' = Q_b U Σ^½ [d_out, k'] and A'' = Σ^½ Vᵀ Q_aᵀ [k', d_in],
    keeping the k' ≤ k singular values above ``rtol·σ_max`` (the dropped ones change ΔW by at most
    ``√(k−k')·rtol·‖ΔW‖₂``). Both factors then carry ‖ΔW‖'s own magnitude, whatever cancelled inside B A.
    """
    with torch.no_grad():
        A, B = f.A.double(), f.B.double()
        Qb, Rb = torch.linalg.qr(B)                                       # [d_out, k], [k, k]
        Qa, Ra = torch.linalg.qr(A.t())                                   # [d_in, k], [k, k]
        U, S, Vh = torch.linalg.svd(Rb @ Ra.t())
        keep = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
        keep = max(keep, 1)
        root = S[:keep].sqrt()
        B2 = (Qb @ U[:, :keep]) * root                                    # [d_out, k']
        A2 = root[:, None] * (Vh[:keep] @ Qa.t())                         # [k', d_in]
        return LowRank(A2.to(f.A.dtype), B2.to(f.B.dtype), f.scaling)


def pad_rank(f: LowRank, rank: int) -> LowRank:
    """``f`` with zero rows of A and zero columns of B up to ``rank`` (the update is unchanged)."""
    extra = rank - f.rank
    if extra <= 0:
        return f
    return LowRank(torch.cat([f.A, f.A.new_zeros(extra, f.A.shape[1])], 0),
                   torch.cat([f.B, f.B.new_zeros(f.B.shape[0], extra)], 1), f.scaling)


def compact_all(folds: dict[str, LowRank], rtol: float = 1e-7) -> dict[str, LowRank]:
    """:func:`compact` every layer, then pad all to the largest rank kept (one PEFT ``r`` for all)."""
    small = {n: compact(f, rtol) for n, f in folds.items()}
    rank = max((f.rank for f in small.values()), default=0)
    return {n: pad_rank(f, rank) for n, f in small.items()}


def folded_weights(model: nn.Module, method: str, task: Optional[int],
                   folds: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """``module name -> W0 + ΔW`` for every adapter layer: exact (``rlora.merge``) for lora/mtl, the
    average-gate fold for hydra/rlora."""
    with torch.no_grad():
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


def _base_module(base: nn.Module, name: str) -> nn.Module:
    """The module ``name`` of the base model, or the one-line error naming the fix."""
    try:
        return base.get_submodule(name)
    except AttributeError:
        raise ExportError(f"the base model has no module {name}: pass the --base-model the adapter was "
                          "trained on") from None


def apply_weights(plain: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Copy folded weights into a plain (adapter-free) copy of the base model."""
    with torch.no_grad():
        for name, w in weights.items():
            lin = _base_module(plain, name)
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
    """Prompt + answer + eos token ids of each row (as in training), right-padded into batches of rows of
    similar length (sorted by length: less padding to run through the model; every measure here is a sum
    over real tokens, so the order does not change it)."""
    from ..data.tokenization import encode_example

    seqs = sorted((encode_example(tokenizer, ex, max_length, use_chat_template)["input_ids"] for ex in examples), key=len)
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


def _logit_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's output layer when ``logits = head(input of head)`` exactly (a plain linear head, no logit
    scaling or soft-capping: the Llama family), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if (isinstance(head, nn.Linear) and not isinstance(head, MultiHeadLoRALinear)
            and mtype in ("llama", "mistral", "qwen2", "qwen3")):
        return head
    return None


@dataclass
class Reference:
    """What one forward of the adapter model over the dev batches leaves for the measurements: the average
    gates ḡ per routed layer, the number T of real tokens, and per batch the input of the output layer at
    the real tokens [tokens, d] (None when the head cannot be re-applied: the logits are then recomputed)."""

    gates: dict[str, torch.Tensor]
    tokens: int
    hidden: Optional[list[torch.Tensor]]


def reference_pass(model: nn.Module, batches: Sequence[TokenBatch], task: Optional[int] = None) -> Reference:
    """One forward of the adapter model over ``batches``: per routed layer the router softmax averaged over
    every real token, ``ḡ = (1/T) Σ_tokens softmax(W_r x)`` [N], and the hidden states that give its logits
    back through the output layer (so the error measurement needs no second adapter forward)."""
    with torch.no_grad():
        layers = [(n, l) for n, l in adapter_layers(model) if isinstance(l, HydraLoRALinear)]
        sums = {n: torch.zeros(l.num_heads, dtype=torch.float64) for n, l in layers}
        state: dict[str, torch.Tensor] = {}
        hidden: list[torch.Tensor] = []
        handles = []

        def hook_for(name: str):
            def hook(mod, args):
                x = args[0]
                g = mod.gates(x.reshape(-1, mod.d_in))                         # [b*L, N] fp32
                w = state["mask"].reshape(-1, 1).to(g.dtype)
                sums[name] += (g * w).sum(0).double().cpu()
            return hook

        def keep_hidden(mod, args):
            hidden.append(args[0][state["mask"].bool()].float().cpu())

        for n, l in layers:
            handles.append(l.register_forward_pre_hook(hook_for(n)))
        head = _logit_head(model)
        if head is not None:
            handles.append(head.register_forward_pre_hook(keep_hidden))
        was_training = model.training
        model.eval()
        tokens = 0
        try:
            dev = _device(model)
            for b in batches:
                state["mask"] = b.attention_mask.to(dev)
                with _routing(task, b.input_ids.shape[0]):
                    model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev), use_cache=False)
                tokens += int(b.attention_mask.sum())
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if tokens == 0:
            raise ExportError("the dev rows hold no tokens: cannot measure the average gates")
        gates = {n: (s / tokens).float() for n, s in sums.items()}
        return Reference(gates, tokens, hidden if head is not None and len(hidden) == len(batches) else None)


def average_gates(model: nn.Module, batches: Sequence[TokenBatch]) -> tuple[dict[str, torch.Tensor], int]:
    """Per routed layer, the router softmax averaged over every real token of ``batches``:
    ``ḡ = (1/T) Σ_tokens softmax(W_r x)`` [N]. Returns (``name -> ḡ``, T)."""
    ref = reference_pass(model, batches)
    return ref.gates, ref.tokens


def relative_errors(adapter_model: nn.Module, candidates: dict[str, nn.Module], batches: Sequence[TokenBatch],
                    task: Optional[int] = None, reference: Optional[Reference] = None) -> dict[str, float]:
    """``name -> ‖logits_candidate − logits_adapter‖_F / ‖logits_adapter‖_F`` over the real tokens of
    ``batches`` (sums of squares in fp64). The adapter's logits come from ``reference.hidden`` through the
    output layer when a :func:`reference_pass` kept them, else from one adapter forward per batch."""
    with torch.no_grad():
        num = {k: 0.0 for k in candidates}
        den = 0.0
        dev_a = _device(adapter_model)
        head = _logit_head(adapter_model) if reference is not None and reference.hidden is not None else None
        for i, b in enumerate(batches):
            m = b.attention_mask.bool()
            if head is not None:
                la = head(reference.hidden[i].to(dev_a, head.weight.dtype)).float().cpu()
            else:
                with _routing(task, b.input_ids.shape[0]):
                    la = adapter_model(input_ids=b.input_ids.to(dev_a), attention_mask=b.attention_mask.to(dev_a),
                                       use_cache=False).logits[m.to(dev_a)].float().cpu()
            den += float(torch.linalg.vector_norm(la, dtype=torch.float64) ** 2)
            for k, cand in candidates.items():
                dev = _device(cand)
                with _routing(task, b.input_ids.shape[0]):               # for a candidate that is an adapter model
                    lp = cand(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev),
                              use_cache=False).logits[m.to(dev)].float().cpu()
                num[k] += float(torch.linalg.vector_norm(lp - la, dtype=torch.float64) ** 2)
                del lp
        if den == 0.0:
            raise ExportError("the dev rows hold no tokens: cannot measure the logit error")
        return {k: math.sqrt(v / den) for k, v in num.items()}


def relative_logit_error(adapter_model: nn.Module, plain_model: nn.Module, batches: Sequence[TokenBatch],
                         task: Optional[int] = None) -> float:
    """``‖logits_plain − logits_adapter‖_F / ‖logits_adapter‖_F`` over the real tokens of ``batches``."""
    with torch.no_grad():
        return relative_errors(adapter_model, {"plain": plain_model}, batches, task)["plain"]


class ServedLoRALinear(nn.Module):
    """One linear layer as vLLM and SGLang run a LoRA adapter: everything in the model dtype,
    ``y = W0 x + (x Aᵀ)(s·B)ᵀ`` -- the scaling folded into B first (vLLM's ``LoRALayerWeights.optimize``),
    A [r, d_in], B [d_out, r] rounded to the dtype before they are used."""

    def __init__(self, base: nn.Linear, f: LowRank, dtype: torch.dtype):
        super().__init__()
        self.base = base
        dev = base.weight.device
        self.A = f.A.detach().float().to(dev, dtype)
        self.B = (f.scaling * f.B.detach().float()).to(dev, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def served_model(base: nn.Module, folds: dict[str, LowRank], dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """``base`` (a plain copy of the base model, cast here to ``dtype``) with every folded layer served as
    an unmerged LoRA in ``dtype``: what an engine computes from the exported PEFT adapter."""
    with torch.no_grad():
        base = base.to(dtype).eval()
        for name, f in folds.items():
            lin = _base_module(base, name)
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name) if parent_name else base, child, ServedLoRALinear(lin, f, dtype))
        return base


def iter_layer_gates(gates: dict[str, torch.Tensor]) -> Iterator[tuple[str, list[float]]]:
    for name, g in gates.items():
        yield name, [round(float(v), 6) for v in g]
