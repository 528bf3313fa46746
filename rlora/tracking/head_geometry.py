"""Head geometry of a multi-head LoRA model from its parameters alone: similarity, norms, rank, mixing.

Notation per adapter layer (see :mod:`rlora.layers.base`): A [r, d_in], heads B_i = B[:, i] [d_out, r]
(i < N), scaling s.  Every head quantity here is a product ``P_i = U_i V`` of a per-head left factor
U_i [d_out, k] and a shared right factor V [k, d_in]; its d_out x d_in matrix is never formed: with
the Gram matrix of the concatenated left factors ``G = U_catᵀ U_cat`` [N·k, N·k] (blocks
``G_ij = U_iᵀ U_j`` [k, k]) and ``M = V Vᵀ`` [k, k] (both float64, one device-to-host copy for all
layers)::

    <U_i V, U_j V>_F  = tr(U_iᵀ U_j V Vᵀ) = Σ_ab (G_ij ∘ M)_ab
    σ(U_i V)²         = eig(M^½ G_ii M^½)                       (k x k instead of d_out x d_in)

Three products per head, each giving a head-similarity figure (mean pairwise cosine):

* ``update``  P_i = B_i A                     (U_i = B_i, V = A): the raw heads, as stored.  With
  ``tr(G_ij)`` it also gives the raw cosine of the flattened B_i (``B_cos``).
* ``learned`` P_i = (B_i − B_i⁰) A            (U_i = B_i − B_i⁰, V = A): what training changed.  B_i⁰ = 0
  for the zero-initialised methods (LoRA, HydraLoRA, MTL-LoRA), so there it equals ``update``;
  R-LoRA's heads start random, and its ``initial_B`` copy gives B_i⁰ (checked against the saved
  offset B̄⁰ = mean_i B_i⁰; when they disagree, e.g. after loading a saved adapter into a freshly
  initialised model, B_i⁰ is unknown and the learned figure is left out).
* ``effective`` P_i = B_i A − B̄⁰ A⁰          (U_i = [B_i | −B̄⁰], V = [A ; A⁰], k = 2r): the change of W0
  when the router sends everything to head i, net of R-LoRA's frozen offset (``s`` omitted: it
  cancels in a cosine).  Without an offset this is ``update``.  At R-LoRA's init the N effective
  updates (B_i⁰ − B̄⁰) A⁰ sum to zero, so their mean pairwise cosine is about −1/(N−1).

Conventions (so that no figure is ever NaN):

* cosine of two heads when either has norm 0 (zero-initialised heads, or R-LoRA's learned updates
  before any step) is defined as **0.0** ("no shared direction"); the diagonal of a similarity matrix
  is 1 for a non-zero head and 0 for a zero head.  Mean pairwise cosine = mean over the pairs i < j.
* effective rank of a zero update is **0.0** (it spans nothing); otherwise exp(H(σ / Σσ)) ∈ [1, r].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..inject import adapter_layers
from ..layers import MTLLoRALinear, RLoRALinear
from .errors import DiagnosticsError

_EIG_TOL = 64 * np.finfo(np.float64).eps   # σ² below this fraction of σ²_max is round-off
KINDS = ("B", "BA", "learned", "effective")
_INIT_MATCH = 1e-2                          # ‖mean_i B_i⁰ − B̄⁰‖ ≤ this · ‖B̄⁰‖: initial_B belongs to this layer


@dataclass
class FactorGram:
    """Per layer, for the products U_i V: G = U_catᵀ U_cat [N·k, N·k], M = V Vᵀ [k, k] (float64, host)."""

    G: np.ndarray
    M: np.ndarray
    heads: int
    k: int
    scaling: float

    def block(self, i: int, j: int) -> np.ndarray:
        k = self.k
        return self.G[i * k:(i + 1) * k, j * k:(j + 1) * k]

    def factor_gram(self) -> np.ndarray:
        """[N, N] Gram matrix of the flattened left factors: tr(U_iᵀ U_j)."""
        N, k = self.heads, self.k
        return np.einsum("iaja->ij", self.G.reshape(N, k, N, k))

    def update_gram(self) -> np.ndarray:
        """[N, N] Gram matrix of the products U_i V: Σ_ab (U_iᵀU_j)_ab (VVᵀ)_ab."""
        N, k = self.heads, self.k
        return np.einsum("iajb,ab->ij", self.G.reshape(N, k, N, k), self.M)


@dataclass
class LayerGrams:
    """The three head products of one layer (``learned`` is None when B_i⁰ is unknown)."""

    update: FactorGram
    learned: Optional[FactorGram]
    effective: FactorGram

    @property
    def heads(self) -> int:
        return self.update.heads


def initial_heads(layer: nn.Module) -> Optional[torch.Tensor]:
    """B⁰ [d_out, N, r] of a layer: zeros for zero-initialised methods; R-LoRA's ``initial_B`` when it
    matches the layer's offset B̄⁰ (or the layer has no offset); None when unknown."""
    B = layer.lora_B.detach()
    if not isinstance(layer, RLoRALinear):
        return torch.zeros_like(B)
    init = getattr(layer, "initial_B", None)
    if init is None or tuple(init.shape) != tuple(B.shape):
        return None
    init = init.to(device=B.device, dtype=torch.float64)
    if getattr(layer, "use_offset", False):
        offset = layer.offset_B.detach().to(device=B.device, dtype=torch.float64)
        if torch.linalg.norm(init.mean(dim=1) - offset) > _INIT_MATCH * torch.linalg.norm(offset):
            return None
    return init


def _factors(layer: nn.Module) -> dict[str, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """{kind: (U [d_out, N, k], V [k, d_in]) in float64, or None}; zero-init layers share one pair."""
    B, A = layer.lora_B.detach().double(), layer.lora_A.detach().double()
    update = (B, A)
    if not isinstance(layer, RLoRALinear):
        return {"update": update, "learned": update, "effective": update}
    init = initial_heads(layer)
    learned = (B - init, A) if init is not None else None
    effective = update
    if getattr(layer, "use_offset", False):
        b0 = layer.offset_B.detach().double().to(B.device)                          # B̄⁰ [d_out, r]
        a0 = layer.offset_A.detach().double().to(B.device)                          # A⁰ [r, d_in]
        effective = (torch.cat([B, -b0[:, None, :].expand_as(B)], dim=2), torch.cat([A, a0]))
    return {"update": update, "learned": learned, "effective": effective}


@torch.no_grad()
def layer_grams(model: nn.Module) -> dict[str, LayerGrams]:
    """{layer: LayerGrams} for every adapter layer (one device-to-host copy for the whole model)."""
    plan, flat = [], []                         # per layer: (name, s, N, {kind: (index of pair, k) or None})
    for name, layer in adapter_layers(model):
        pairs: dict[int, tuple[int, int]] = {}
        kinds = {}
        for kind, fv in _factors(layer).items():
            if fv is None:
                kinds[kind] = None
                continue
            if id(fv) not in pairs:
                U, V = fv
                u_cat = U.reshape(U.shape[0], -1)
                flat += [(u_cat.t() @ u_cat).reshape(-1), (V @ V.t()).reshape(-1)]
                pairs[id(fv)] = (len(flat) - 2, U.shape[2])
            kinds[kind] = pairs[id(fv)]
        plan.append((name, float(layer.scaling), layer.lora_B.shape[1], kinds))
    if not plan:
        return {}
    sizes = [t.numel() for t in flat]
    host = torch.cat([t.to("cpu") for t in flat]).numpy()   # one synchronisation for the whole model
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = {}
    for name, s, N, kinds in plan:
        grams: dict[str, Optional[FactorGram]] = {}
        for kind, where in kinds.items():
            if where is None:
                grams[kind] = None
                continue
            idx, k = where
            G = host[starts[idx]:starts[idx + 1]].reshape(N * k, N * k)
            M = host[starts[idx + 1]:starts[idx + 2]].reshape(k, k)
            grams[kind] = FactorGram(G, M, N, k, s)
        out[name] = LayerGrams(grams["update"], grams["learned"], grams["effective"])
    return out


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Cosine matrix from a Gram matrix: g_ij / (‖i‖‖j‖), 0 where either norm is 0, diagonal 1 for
    non-zero vectors (0 for zero vectors), clipped to [-1, 1]."""
    gram = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    cos = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
    np.fill_diagonal(cos, (norms > 0).astype(np.float64))
    return np.clip(cos, -1.0, 1.0)


def mean_pairwise(cos: np.ndarray) -> float:
    """Mean of the entries above the diagonal (0.0 for fewer than two heads)."""
    n = cos.shape[0]
    if n < 2:
        return 0.0
    return float(cos[np.triu_indices(n, k=1)].mean())


def _kind_gram(g: LayerGrams, kind: str) -> Optional[np.ndarray]:
    if kind == "B":
        return g.update.factor_gram()
    fg = {"BA": g.update, "learned": g.learned, "effective": g.effective}[kind]
    return None if fg is None else fg.update_gram()


def head_similarity_matrices(model: nn.Module, kind: str = "BA", grams: Optional[dict] = None) -> dict[str, np.ndarray]:
    """{layer: [N, N] cosine matrix} for every adapter layer with N >= 2 heads.

    ``kind="B"``: cosine of the flattened heads B_i; ``"BA"``: of the updates B_i A; ``"learned"``: of
    (B_i − B_i⁰) A (layers whose B_i⁰ is unknown are left out); ``"effective"``: of B_i A − B̄⁰ A⁰.
    Zero heads: see the module docstring."""
    if kind not in KINDS:
        raise DiagnosticsError(f"head_similarity_matrices: kind must be one of {list(KINDS)}, got {kind!r}")
    grams = layer_grams(model) if grams is None else grams
    out = {}
    for name, g in grams.items():
        gram = _kind_gram(g, kind) if g.heads >= 2 else None
        if gram is not None:
            out[name] = cosine_from_gram(gram)
    return out


def head_similarity(model: nn.Module, grams: Optional[dict] = None) -> dict[str, dict[str, float]]:
    """{layer: {"B_cos": mean_{i<j} cos(B_i, B_j), "BA_cos": mean_{i<j} cos(B_i A, B_j A)}} for N >= 2:
    the raw heads.  ≈ 0 at R-LoRA's random init (independent Gaussian heads), exactly 0.0 at
    HydraLoRA / MTL-LoRA init (zero heads, by the convention above), → 1 when the heads collapse."""
    grams = layer_grams(model) if grams is None else grams
    return {name: {"B_cos": mean_pairwise(cosine_from_gram(_kind_gram(g, "B"))),
                   "BA_cos": mean_pairwise(cosine_from_gram(_kind_gram(g, "BA")))}
            for name, g in grams.items() if g.heads >= 2}


def update_similarity(model: nn.Module, grams: Optional[dict] = None) -> dict[str, dict[str, float]]:
    """{layer: {"learned_cos": mean_{i<j} cos((B_i − B_i⁰)A, (B_j − B_j⁰)A),
    "effective_cos": mean_{i<j} cos(B_i A − B̄⁰A⁰, B_j A − B̄⁰A⁰)}} for N >= 2 (``learned_cos`` absent
    where B_i⁰ is unknown).  Equal to ``BA_cos`` for zero-initialised methods; for R-LoRA they separate
    what training did from the random init (learned: 0.0 before the first step)."""
    grams = layer_grams(model) if grams is None else grams
    out = {}
    for name, g in grams.items():
        if g.heads < 2:
            continue
        row = {"effective_cos": mean_pairwise(cosine_from_gram(_kind_gram(g, "effective")))}
        learned = _kind_gram(g, "learned")
        if learned is not None:
            row["learned_cos"] = mean_pairwise(cosine_from_gram(learned))
        out[name] = row
    return out


def head_norms(model: nn.Module, grams: Optional[dict] = None) -> dict[str, np.ndarray]:
    """{layer: [N]} Frobenius norms ‖ΔW_i‖_F = s · sqrt(tr(B_iᵀB_i AAᵀ)) of each head's update B_i A."""
    grams = layer_grams(model) if grams is None else grams
    return {name: g.update.scaling * np.sqrt(np.clip(np.diag(g.update.update_gram()), 0.0, None))
            for name, g in grams.items()}


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def entropy_rank(sigma: np.ndarray) -> float:
    """exp(H(p)) with p = σ / Σσ (0 log 0 = 0); 0.0 when all σ are 0."""
    sigma = np.clip(np.asarray(sigma, dtype=np.float64), 0.0, None)
    total = sigma.sum()
    if not total > 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def effective_rank(model: nn.Module, grams: Optional[dict] = None) -> dict[str, np.ndarray]:
    """{layer: [N]} entropy effective rank exp(H(σ/Σσ)) of each head's update B_i A (scale-free).

    The singular values come from the r x r matrix M^½ (B_iᵀB_i) M^½ with M = AAᵀ, whose eigenvalues
    are σ(B_i A)², so d_out x d_in is never formed (eigenvalues below 64·eps of the largest, i.e.
    σ < ~1.2e-7 σ_max, count as round-off zeros).  A zero head has effective rank 0.0."""
    grams = layer_grams(model) if grams is None else grams
    out = {}
    for name, lg in grams.items():
        g = lg.update
        root = _psd_sqrt(g.M)
        ranks = []
        for i in range(g.heads):
            eig = np.linalg.eigvalsh(root @ g.block(i, i) @ root)
            eig[eig <= _EIG_TOL * max(eig.max(), 0.0)] = 0.0      # round-off around exact zeros
            ranks.append(entropy_rank(np.sqrt(eig)))
        out[name] = np.array(ranks)
    return out


@torch.no_grad()
def mtl_mixing(model: nn.Module) -> Optional[dict]:
    """For MTL-LoRA: {"mixing": [T, n] mean over layers of softmax(w_t/τ) (rows sum to 1),
    "lambda_dev": [T] mean over layers of ‖Λ_t − I‖_F, "per_layer": {layer: {"mixing", "lambda_dev"}}}.
    ``None`` when the model has no MTL-LoRA layer."""
    per_layer, mix, dev = {}, [], []
    for name, layer in adapter_layers(model):
        if not isinstance(layer, MTLLoRALinear):
            continue
        m = layer.mixing().detach().double()
        lam = layer.lambdas().detach().double()
        eye = torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device)
        d = torch.linalg.matrix_norm(lam - eye)   # Frobenius, [T]
        mix.append(m)
        dev.append(d)
        per_layer[name] = (m, d)
    if not per_layer:
        return None
    mix_h = torch.stack(mix).cpu().numpy()
    dev_h = torch.stack(dev).cpu().numpy()
    return {"mixing": mix_h.mean(axis=0), "lambda_dev": dev_h.mean(axis=0),
            "per_layer": {name: {"mixing": mix_h[k], "lambda_dev": dev_h[k]} for k, name in enumerate(per_layer)}}


__all__ = ["FactorGram", "LayerGrams", "KINDS", "layer_grams", "initial_heads", "cosine_from_gram", "mean_pairwise",
           "head_similarity_matrices", "head_similarity", "update_similarity", "head_norms", "entropy_rank",
           "effective_rank", "mtl_mixing"]
