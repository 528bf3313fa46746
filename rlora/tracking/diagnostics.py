"""Head and task diagnostics of a multi-head LoRA model, cheap enough to run every few dozen steps.

Everything here is a pure function of the model's adapter parameters (and, for the router and the
task interference, of a small *probe*: one left-padded batch of a few examples per task) that
returns plain Python / numpy values.  The model must be the unwrapped module with its adapter
parameters fully materialised (rank 0 under ZeRO-3 gathers them first).

Notation per adapter layer (see :mod:`rlora.layers.base`): A [r, d_in], heads B_i = B[:, i] [d_out, r]
(i < N), scaling s.  The head updates ``ΔW_i = s · B_i A`` are never formed: with the Gram matrix of
the concatenated heads ``G = B_catᵀ B_cat`` [N·r, N·r] (blocks ``G_ij = B_iᵀ B_j`` [r, r]) and
``M = A Aᵀ`` [r, r] (both computed in float64, one device-to-host copy for all layers)::

    <B_i, B_j>_F      = tr(G_ij)
    <B_i A, B_j A>_F  = tr(B_iᵀ B_j A Aᵀ) = Σ_ab (G_ij ∘ M)_ab
    σ(B_i A)²         = eig(M^½ G_ii M^½)                       (r x r instead of d_out x d_in)

Conventions (so that no metric is ever NaN):

* cosine of two heads when either has norm 0 (HydraLoRA / MTL-LoRA heads start at exactly zero) is
  defined as **0.0** ("no shared direction"); the diagonal of a similarity matrix is 1 for a
  non-zero head and 0 for a zero head.  Mean pairwise cosine = mean over the N(N-1)/2 pairs i < j.
* effective rank of a zero update is **0.0** (it spans nothing); otherwise exp(H(σ / Σσ)) ∈ [1, r].
* normalised router entropy of a one-head router is 1.0 (its only gate equals the uniform 1/N).
* a task whose probe gradient is exactly zero gets a zero row and column (diagonal included) in the
  interference matrix; a task absent from the probe gets NaN there (the dynamic sampler skips NaN)
  and is left out of the metrics.
"""
from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..context import task_ids as task_ids_context
from ..inject import adapter_layers
from ..layers import HydraLoRALinear, MTLLoRALinear

PREFIX = "diag"
_REQUIRED = ("input_ids", "attention_mask", "task_ids")
_EIG_TOL = 64 * np.finfo(np.float64).eps   # σ² below this fraction of σ²_max is round-off


class DiagnosticsError(ValueError):
    """Bad input to a diagnostic (one line, names the argument and the fix)."""


# --------------------------------------------------------------------------------------------
# Head geometry from the parameters alone
# --------------------------------------------------------------------------------------------
@dataclass
class _Gram:
    """Per layer: G = B_catᵀ B_cat [N·r, N·r], M = A Aᵀ [r, r] (float64, host), N, r, s."""

    G: np.ndarray
    M: np.ndarray
    heads: int
    r: int
    scaling: float

    def block(self, i: int, j: int) -> np.ndarray:
        r = self.r
        return self.G[i * r:(i + 1) * r, j * r:(j + 1) * r]

    def head_gram(self) -> np.ndarray:
        """[N, N] Gram matrix of the flattened heads: tr(B_iᵀ B_j)."""
        N, r = self.heads, self.r
        return np.einsum("iaja->ij", self.G.reshape(N, r, N, r))

    def update_gram(self) -> np.ndarray:
        """[N, N] Gram matrix of the head updates B_i A (without s): Σ_ab (B_iᵀB_j)_ab (AAᵀ)_ab."""
        N, r = self.heads, self.r
        return np.einsum("iajb,ab->ij", self.G.reshape(N, r, N, r), self.M)


@torch.no_grad()
def _grams(model: nn.Module) -> dict[str, _Gram]:
    names, shapes, flat = [], [], []
    for name, layer in adapter_layers(model):
        B = layer.lora_B.detach()
        N, r = B.shape[1], B.shape[2]
        b_cat = B.reshape(B.shape[0], N * r).double()
        a = layer.lora_A.detach().double()
        flat += [(b_cat.t() @ b_cat).reshape(-1), (a @ a.t()).reshape(-1)]
        names.append((name, float(layer.scaling)))
        shapes.append((N, r))
    if not names:
        return {}
    host = torch.cat([t.to("cpu") for t in flat]).numpy()  # one synchronisation for the whole model
    out, pos = {}, 0
    for (name, s), (N, r) in zip(names, shapes):
        g = host[pos:pos + (N * r) ** 2].reshape(N * r, N * r)
        pos += (N * r) ** 2
        m = host[pos:pos + r * r].reshape(r, r)
        pos += r * r
        out[name] = _Gram(g, m, N, r, s)
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


def head_similarity_matrices(model: nn.Module, kind: str = "BA", grams: Optional[dict] = None) -> dict[str, np.ndarray]:
    """{layer: [N, N] cosine matrix} for every adapter layer with N >= 2 heads.

    ``kind="B"``: cosine of the flattened heads B_i; ``kind="BA"``: cosine of the updates B_i A
    (the directions the heads actually move W0 in).  Zero heads: see the module docstring."""
    if kind not in ("B", "BA"):
        raise DiagnosticsError(f"head_similarity_matrices: kind must be 'B' or 'BA', got {kind!r}")
    grams = _grams(model) if grams is None else grams
    return {name: cosine_from_gram(g.head_gram() if kind == "B" else g.update_gram())
            for name, g in grams.items() if g.heads >= 2}


def head_similarity(model: nn.Module, grams: Optional[dict] = None) -> dict[str, dict[str, float]]:
    """{layer: {"B_cos": mean_{i<j} cos(B_i, B_j), "BA_cos": mean_{i<j} cos(B_i A, B_j A)}} for N >= 2.

    ≈ 0 at R-LoRA's random init (independent Gaussian heads), exactly 0.0 at HydraLoRA / MTL-LoRA
    init (zero heads, by the convention above), → 1 when the heads collapse onto one direction."""
    grams = _grams(model) if grams is None else grams
    return {name: {"B_cos": mean_pairwise(cosine_from_gram(g.head_gram())),
                   "BA_cos": mean_pairwise(cosine_from_gram(g.update_gram()))}
            for name, g in grams.items() if g.heads >= 2}


def head_norms(model: nn.Module, grams: Optional[dict] = None) -> dict[str, np.ndarray]:
    """{layer: [N]} Frobenius norms ‖ΔW_i‖_F = s · sqrt(tr(B_iᵀB_i AAᵀ)) of each head's update."""
    grams = _grams(model) if grams is None else grams
    return {name: g.scaling * np.sqrt(np.clip(np.diag(g.update_gram()), 0.0, None)) for name, g in grams.items()}


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
    grams = _grams(model) if grams is None else grams
    out = {}
    for name, g in grams.items():
        root = _psd_sqrt(g.M)
        ranks = []
        for i in range(g.heads):
            eig = np.linalg.eigvalsh(root @ g.block(i, i) @ root)
            eig[eig <= _EIG_TOL * max(eig.max(), 0.0)] = 0.0      # round-off around exact zeros
            ranks.append(entropy_rank(np.sqrt(eig)))
        out[name] = np.array(ranks)
    return out


# --------------------------------------------------------------------------------------------
# MTL-LoRA task mixing (parameters only)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Probe batches: router usage and task interference
# --------------------------------------------------------------------------------------------
def make_probe(features: Mapping[str, Sequence[dict]], task_names: Sequence[str], pad_token_id: int,
               per_task: int = 4) -> dict[str, dict]:
    """{task: left-padded batch of its first ``per_task`` encoded rows} (task id = index in task_names).

    ``features[task]`` are encoded rows (``input_ids``, ``labels``) as made by
    :func:`rlora.data.encode_example`; tasks without rows are skipped."""
    from ..train.batches import left_padded_batch

    if per_task < 1:
        raise DiagnosticsError(f"make_probe: per_task must be >= 1, got {per_task} (diagnostics.probe_batch_size)")
    unknown = sorted(set(features) - set(task_names))
    if unknown:
        raise DiagnosticsError(f"make_probe: tasks {unknown} are not in task_names {list(task_names)}")
    probe = {}
    for tid, name in enumerate(task_names):
        rows = list(features.get(name, ()))[:per_task]
        if rows:
            probe[name] = left_padded_batch(rows, pad_token_id, [tid] * len(rows))
    return probe


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _prepare(name: str, batch: Mapping, device: torch.device) -> dict:
    if not isinstance(batch, Mapping):
        raise DiagnosticsError(f"probe['{name}'] is a {type(batch).__name__}, not a batch dict: build it with "
                               "rlora.tracking.diagnostics.make_probe or rlora.train.batches.left_padded_batch")
    missing = [k for k in _REQUIRED if k not in batch]
    if missing:
        raise DiagnosticsError(f"probe['{name}'] lacks {missing}: build it with rlora.train.batches.left_padded_batch")
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if "position_ids" not in out:
        out["position_ids"] = (out["attention_mask"].long().cumsum(dim=1) - 1).clamp(min=0)
    return out


def _task_of(name: str, batch: dict, num_tasks: Optional[int]) -> int:
    ids = torch.as_tensor(batch["task_ids"]).reshape(-1)
    if ids.numel() == 0 or bool((ids != ids[0]).any()):
        raise DiagnosticsError(f"probe['{name}'] mixes task ids {sorted(set(ids.tolist()))}: give each task its "
                               "own probe batch")
    t = int(ids[0])
    if t < 0 or (num_tasks is not None and t >= num_tasks):
        raise DiagnosticsError(f"probe['{name}'] has task id {t}, outside 0..{(num_tasks or 1) - 1}")
    return t


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


class _GateRecorder:
    """Wraps ``layer.gates`` of every routed layer; sums gates and normalised entropies over the
    non-pad tokens of the current probe batch (on the device, no synchronisation)."""

    def __init__(self, model: nn.Module):
        self.layers = [(n, l) for n, l in adapter_layers(model) if isinstance(l, HydraLoRALinear)]
        self.weight: Optional[torch.Tensor] = None     # 1.0 on the non-pad tokens of the current batch
        self.count = 0
        self.acc: dict[str, list] = {}

    def __enter__(self) -> "_GateRecorder":
        self._saved = []
        try:
            for name, layer in self.layers:
                self._saved.append((layer, layer.__dict__.get("gates")))
                layer.gates = self._wrap(name, layer.gates)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for layer, own in self._saved:
            if own is None:
                layer.__dict__.pop("gates", None)
            else:
                layer.__dict__["gates"] = own
        self._saved = []

    def _wrap(self, name: str, gates):
        def recorded(x: torch.Tensor) -> torch.Tensor:
            g = gates(x)
            self._record(name, g.detach())
            return g
        return recorded

    def _record(self, name: str, g: torch.Tensor) -> None:
        g = g.reshape(-1, g.shape[-1]).double()
        n = g.shape[-1]
        if n > 1:
            ent = -torch.special.xlogy(g, g).sum(dim=-1) / math.log(n)
        else:
            ent = torch.ones(g.shape[0], dtype=g.dtype, device=g.device)
        if self.weight is not None and self.weight.numel() == g.shape[0]:
            w = self.weight.to(g.device)           # masked sums: no data-dependent shapes, no sync
            g_sum, e_sum, count = w @ g, w @ ent, self.count
        else:
            g_sum, e_sum, count = g.sum(dim=0), ent.sum(), g.shape[0]
        acc = self.acc.setdefault(name, [0.0, 0.0, 0])
        acc[0] = acc[0] + g_sum
        acc[1] = acc[1] + e_sum
        acc[2] += count

    def begin(self, mask: torch.Tensor) -> None:
        self.weight = mask.reshape(-1).double()
        self.count = int(mask.sum())
        self.acc = {}

    def end(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (mean gate [N], mean normalised entropy)} for the batch just run."""
        out = {name: (a[0] / a[2], a[1] / a[2]) for name, a in self.acc.items() if a[2] > 0}
        self.acc, self.weight = {}, None
        return out


def _router_result(per_task: list[dict], names: list[str]) -> Optional[dict]:
    layers = [n for n in per_task[0]] if per_task else []
    if not layers:
        return None
    flat = torch.cat([torch.cat([d[l][0].reshape(-1), d[l][1].reshape(1)]) for d in per_task for l in layers])
    arr = flat.cpu().numpy().reshape(len(per_task), len(layers), -1)       # [T, layers, N + 1]
    usage_l, ent_l = arr[..., :-1], np.clip(arr[..., -1], 0.0, 1.0)
    return {"tasks": names, "usage": usage_l.mean(axis=1), "entropy": ent_l.mean(axis=1),
            "per_layer": {l: {"usage": usage_l[:, k], "entropy": ent_l[:, k]} for k, l in enumerate(layers)}}


def _forward_only(model: nn.Module, batch: dict) -> None:
    with task_ids_context(batch["task_ids"]):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False)


def has_router(model: nn.Module) -> bool:
    return any(isinstance(l, HydraLoRALinear) for _, l in adapter_layers(model))


def router_usage(model: nn.Module, probe: Mapping[str, Mapping]) -> Optional[dict]:
    """Router statistics of HydraLoRA / R-LoRA on each task's probe batch (eval mode, no grad).

    Returns ``{"tasks": [names in probe order], "usage": [T, N], "entropy": [T],
    "per_layer": {layer: {"usage": [T, N], "entropy": [T]}}}`` where, with g(x) = softmax(W_r x) the
    gates of a token, ``usage[t, i]`` = mean over layers of the mean of g_i over the non-pad tokens of
    task t (rows sum to 1) and ``entropy[t]`` = mean over layers and tokens of H(g) / log N ∈ [0, 1]
    (1 = uniform routing, 0 = one head per token).  ``None`` when the model has no router."""
    if not has_router(model):
        return None
    device = _device(model)
    per_task, names = [], []
    with torch.no_grad(), eval_mode(model), _GateRecorder(model) as rec:
        for name, batch in probe.items():
            b = _prepare(name, batch, device)
            _task_of(name, b, None)
            rec.begin(b["attention_mask"])
            _forward_only(model, b)
            per_task.append(rec.end())
            names.append(name)
    return _router_result(per_task, names)


def _trainable_adapter_params(model: nn.Module) -> list[torch.Tensor]:
    seen, params = set(), []
    for _, layer in adapter_layers(model):
        for p in layer.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _gradient_pass(model: nn.Module, probe: Mapping[str, Mapping], num_tasks: int,
                   record_gates: bool) -> tuple[np.ndarray, Optional[dict]]:
    """One forward + autograd.grad per probe task (eval mode): interference matrix and, if asked,
    the router statistics captured during the same forwards."""
    from ..train.batches import forward_loss

    params = _trainable_adapter_params(model)
    if not params:
        raise DiagnosticsError("task_interference: the model has no trainable adapter parameter: inject adapters "
                               "(rlora.inject) and leave their requires_grad on")
    device = _device(model)
    rows: dict[int, torch.Tensor] = {}
    per_task, names = [], []
    recorder = _GateRecorder(model) if record_gates else None
    with eval_mode(model), (recorder if recorder is not None else _null()):
        for name, batch in probe.items():
            b = _prepare(name, batch, device)
            t = _task_of(name, b, num_tasks)
            if t in rows:
                raise DiagnosticsError(f"probe['{name}'] repeats task id {t}: give each task one probe batch")
            if recorder is not None:
                recorder.begin(b["attention_mask"])
            with torch.enable_grad():
                loss, _, _ = forward_loss(model, b, num_tasks)
                if loss.requires_grad:
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                else:
                    grads = [None] * len(params)
            rows[t] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                 for g, p in zip(grads, params)])
            del grads, loss
            if recorder is not None:
                per_task.append(recorder.end())
                names.append(name)
    order = sorted(rows)
    stacked = torch.stack([rows.pop(t) for t in order])                      # [T_probe, P] fp32
    gram = torch.zeros(len(order), len(order), dtype=torch.float64, device=stacked.device)
    for start in range(0, stacked.shape[1], 1 << 22):                          # float64 in chunks
        chunk = stacked[:, start:start + (1 << 22)].double()
        gram += chunk @ chunk.t()
    cos = cosine_from_gram(gram.cpu().numpy())
    matrix = np.full((num_tasks, num_tasks), np.nan)
    matrix[np.ix_(order, order)] = cos
    router = _router_result(per_task, names) if recorder is not None else None
    return matrix, router


@contextmanager
def _null() -> Iterator[None]:
    yield


def task_interference(model: nn.Module, probe: Mapping[str, Mapping], num_tasks: int) -> np.ndarray:
    """[num_tasks, num_tasks] cosine between per-task gradients of all trainable adapter parameters.

    For each probe batch (one task each; row/column = its task id) the mean answer-token loss L_t
    (:func:`rlora.train.batches.forward_loss`) is differentiated with ``torch.autograd.grad`` (the
    parameters' ``.grad`` are left untouched), g_t = flatten-concat(∂L_t/∂θ), and
    ``C[t, u] = <g_t, g_u> / (‖g_t‖ ‖g_u‖)`` (float64).  The model runs in eval mode (no dropout, so
    the result is deterministic) and its train/eval flags are restored.  Symmetric, unit diagonal;
    a task with an exactly zero gradient has a zero row/column (diagonal included); a task absent
    from the probe has NaN.  Negative entries: the two tasks pull the shared adapter apart."""
    return _gradient_pass(model, probe, num_tasks, record_gates=False)[0]


def interference_summary(matrix: np.ndarray) -> np.ndarray:
    """[T] mean cosine of each task to the other tasks (NaN entries skipped; 0.0 if none), the
    ``c_t`` that :class:`rlora.sampler.dynamic.DynamicBalancer` derives from the matrix passed to
    ``TaskSampler.update(task_losses, conflict=matrix)``."""
    c = np.array(matrix, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise DiagnosticsError(f"interference_summary: expected a T x T matrix, got shape {c.shape}")
    np.fill_diagonal(c, np.nan)
    valid = np.isfinite(c)
    sums = np.where(valid, c, 0.0).sum(axis=1)
    counts = valid.sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


# --------------------------------------------------------------------------------------------
# Everything at once, and the MLflow metrics
# --------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")


def metric_segment(text: str, limit: int = 64) -> str:
    """One MLflow-safe path segment: characters outside ``A-Za-z0-9_-. `` (and '/') become '_',
    dot-only or empty segments become '_', at most ``limit`` characters."""
    seg = _UNSAFE.sub("_", str(text)).strip()[:limit]
    return "_" if not seg.strip(".") else seg


def _unique_segments(names: Sequence[str]) -> list[str]:
    out, seen = [], set()
    for i, n in enumerate(names):
        seg = metric_segment(n)
        if seg in seen:
            seg = metric_segment(f"{seg}_{i}")
        seen.add(seg)
        out.append(seg)
    return out


def module_type(layer_name: str) -> str:
    """The kind of module an adapter layer wraps: the last component of its name (``q_proj``)."""
    return layer_name.rsplit(".", 1)[-1]


@dataclass
class Diagnostics:
    """Everything one diagnostics pass computed (arrays as documented on each function)."""

    task_names: list[str]
    similarity: dict[str, dict[str, float]] = field(default_factory=dict)
    matrices: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # layer -> {"B", "BA"}
    norms: dict[str, np.ndarray] = field(default_factory=dict)
    eff_rank: dict[str, np.ndarray] = field(default_factory=dict)
    router: Optional[dict] = None
    mtl: Optional[dict] = None
    interference: Optional[np.ndarray] = None
    seconds: float = 0.0

    @property
    def conflict(self) -> Optional[np.ndarray]:
        """The [T, T] matrix to pass as ``TaskSampler.update(..., conflict=...)``."""
        return self.interference

    def metrics(self) -> dict[str, float]:
        return _flatten(self)


def run_diagnostics(model: nn.Module, probe: Optional[Mapping[str, Mapping]], task_names: Sequence[str],
                    interference: bool = True) -> Diagnostics:
    """All diagnostics in one pass: head geometry from the parameters, and — when a probe is given —
    one forward + ``autograd.grad`` per task that yields both the interference matrix and the router
    statistics (gates captured during the same forwards).  ``interference=False`` (or no trainable
    adapter parameter) runs the probe without gradients, for the router only.

    Cost: the parameter part is negligible (SmolLM2-135M, 210 layers: ~0.05 s CPU); the probe part is
    one forward + backward of the probe rows, e.g. 6 tasks x 2 rows ≈ 3 training steps of 4 rows."""
    start = time.perf_counter()
    task_names = list(task_names)
    if probe:
        unknown = [k for k in probe if k not in task_names]
        if unknown:
            raise DiagnosticsError(f"probe tasks {unknown} are not in task_names {task_names}")
    grams = _grams(model)
    if not grams:
        raise DiagnosticsError("the model has no adapter layer: call rlora.inject (or rlora.load_adapter) first")
    d = Diagnostics(task_names=task_names)
    d.similarity = head_similarity(model, grams)
    b_mats = head_similarity_matrices(model, "B", grams)
    ba_mats = head_similarity_matrices(model, "BA", grams)
    d.matrices = {k: {"B": b_mats[k], "BA": ba_mats[k]} for k in b_mats}
    d.norms = head_norms(model, grams)
    d.eff_rank = effective_rank(model, grams)
    d.mtl = mtl_mixing(model)
    if probe:
        routed = has_router(model)
        if interference and _trainable_adapter_params(model):
            d.interference, d.router = _gradient_pass(model, probe, len(task_names), record_gates=routed)
        elif routed:
            d.router = router_usage(model, probe)
    d.seconds = time.perf_counter() - start
    return d


def diagnostics_metrics(model: nn.Module, probe: Optional[Mapping[str, Mapping]],
                        task_names: Sequence[str]) -> dict[str, float]:
    """``run_diagnostics(...).metrics()``: a flat {MLflow metric name: finite float}.

    Names (``<type>`` = wrapped module kind such as ``q_proj``, so the count does not grow with depth)::

        diag/head_cos_B/{mean,max,<type>}    diag/head_cos_BA/{mean,max,<type>}
        diag/head_norm/{mean,<type>}         diag/eff_rank/{mean,min,<type>}
        diag/router_entropy/{<task>,mean}    diag/router_usage/<task>/head<i>
        diag/mtl_mix/<task>/head<i>          diag/lambda_dev/{<task>,mean}
        diag/interference/<a>__<b> (a before b)   diag/interference/{mean,min}
        diag/interference_task/<task>        diag/seconds
    """
    return run_diagnostics(model, probe, task_names).metrics()


def _by_type(values: dict[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for name, v in values.items():
        groups.setdefault(module_type(name), []).append(v)
    return {t: float(np.mean(v)) for t, v in groups.items()}


def _flatten(d: Diagnostics) -> dict[str, float]:
    m: dict[str, float] = {}
    tasks = _unique_segments(d.task_names)
    seg = dict(zip(d.task_names, tasks))

    for key, metric in (("B_cos", "head_cos_B"), ("BA_cos", "head_cos_BA")):
        vals = {n: s[key] for n, s in d.similarity.items()}
        if vals:
            m[f"{PREFIX}/{metric}/mean"] = float(np.mean(list(vals.values())))
            m[f"{PREFIX}/{metric}/max"] = float(np.max(list(vals.values())))
            for t, v in _by_type(vals).items():
                m[f"{PREFIX}/{metric}/{metric_segment(t)}"] = v
    if d.norms:
        vals = {n: float(np.mean(v)) for n, v in d.norms.items()}
        m[f"{PREFIX}/head_norm/mean"] = float(np.mean(list(vals.values())))
        for t, v in _by_type(vals).items():
            m[f"{PREFIX}/head_norm/{metric_segment(t)}"] = v
    if d.eff_rank:
        vals = {n: float(np.mean(v)) for n, v in d.eff_rank.items()}
        m[f"{PREFIX}/eff_rank/mean"] = float(np.mean(list(vals.values())))
        m[f"{PREFIX}/eff_rank/min"] = float(min(np.min(v) for v in d.eff_rank.values()))
        for t, v in _by_type(vals).items():
            m[f"{PREFIX}/eff_rank/{metric_segment(t)}"] = v
    if d.router is not None:
        for k, name in enumerate(d.router["tasks"]):
            s = seg.get(name, metric_segment(name))
            m[f"{PREFIX}/router_entropy/{s}"] = float(d.router["entropy"][k])
            for i, u in enumerate(d.router["usage"][k]):
                m[f"{PREFIX}/router_usage/{s}/head{i}"] = float(u)
        m[f"{PREFIX}/router_entropy/mean"] = float(np.mean(d.router["entropy"]))
    if d.mtl is not None:
        rows = d.mtl["mixing"].shape[0]
        labels = tasks if len(tasks) == rows else [f"task{k}" for k in range(rows)]
        for k, s in enumerate(labels):
            for i, u in enumerate(d.mtl["mixing"][k]):
                m[f"{PREFIX}/mtl_mix/{s}/head{i}"] = float(u)
            m[f"{PREFIX}/lambda_dev/{s}"] = float(d.mtl["lambda_dev"][k])
        m[f"{PREFIX}/lambda_dev/mean"] = float(np.mean(d.mtl["lambda_dev"]))
    if d.interference is not None:
        c = d.interference
        present = [t for t in range(c.shape[0]) if np.isfinite(c[t, t])]
        pairs = [float(c[a, b]) for i, a in enumerate(present) for b in present[i + 1:]]
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                m[f"{PREFIX}/interference/{tasks[a]}__{tasks[b]}"] = float(c[a, b])
        if pairs:
            m[f"{PREFIX}/interference/mean"] = float(np.mean(pairs))
            m[f"{PREFIX}/interference/min"] = float(np.min(pairs))
            summary = interference_summary(c)
            for t in present:
                m[f"{PREFIX}/interference_task/{tasks[t]}"] = float(summary[t])
    m[f"{PREFIX}/seconds"] = float(d.seconds)
    return {k[:250]: v for k, v in m.items() if math.isfinite(v)}


__all__ = ["DiagnosticsError", "Diagnostics", "run_diagnostics", "diagnostics_metrics", "head_similarity",
           "head_similarity_matrices", "head_norms", "effective_rank", "router_usage", "mtl_mixing",
           "task_interference", "interference_summary", "make_probe", "cosine_from_gram", "entropy_rank",
           "metric_segment", "module_type", "eval_mode", "has_router"]
