"""Align-LoRA's alignment loss (arXiv 2508.05078): the tasks' representations in the shared low-rank space
are pulled together, instead of being given heads of their own.

For one adapted layer with down-projection A [r, d_in], every real (non-padding) token i of the
micro-batch has a task τ(i) (its sample's task id) and a rank-space feature ``z_i = A drop(x_i)`` [r]
(what feeds B; the layer's ``u_i = s z_i`` divided by the scaling s). Per task t present with n_t ≥ 2
tokens, a diagonal Gaussian is fitted over its tokens::

    μ_t = (1/n_t) Σ_{τ(i)=t} z_i                         [r]
    σ²_t = 1/(n_t − 1) Σ_{τ(i)=t} (z_i − μ_t)²          [r]   (unbiased, per component)
    v_t = σ²_t + ε                                       (ε = 1e-8)

and two tasks' fits are compared by the symmetric KL divergence, the mean of the two directions::

    KL(p‖q) = ½ Σ_k [ log v_qk − log v_pk + v_pk / v_qk + (μ_pk − μ_qk)² / v_qk − 1 ]
    D(p, q) = ½ (KL(p‖q) + KL(q‖p)) = ¼ Σ_k [ v_pk/v_qk + v_qk/v_pk − 2 + (μ_pk − μ_qk)² (1/v_pk + 1/v_qk) ]

(the log terms cancel). A layer's term is the mean of D over the pairs of tasks present in the
micro-batch; the alignment loss is the mean over the layers that have a pair, and training minimises
``L = L_answer + λ · L_align`` (``adapter.align_lambda``, λ = 0.2 by default). D is invariant to a
common scaling of both tasks' features (up to ε), so z and u = s z give the same term.

What the authors' code does and where this differs (the paper's method section was not reachable
here; its released code, KL variant, was read for these facts): the same symmetric KL of diagonal
Gaussians with ε = 1e-8 on the variances, on PEFT's ``lora_A`` output (A drop(x)), the mean over task
pairs and then over layers, λ = 0.2 in its training script; it fits each *sequence position* over the
samples of a task, in batches built with an equal share of every task and padded to one length, and
adds the term once per optimizer step over the accumulated micro-batches. rlora's micro-batches are
left-padded to their own length and sampled (a task may be absent, or alone), so the fit here pools a
task's real tokens (the attention mask; prompt and answer tokens, never padding), and the term is
added per micro-batch (the loop's gradient accumulation then averages it over the step's micro-batches
and ranks).

One task in a micro-batch (``sampler.batch_composition: homogeneous``, or a mixed batch that drew one
task): there is no pair, so the task's fit is compared with the most recent fit of each other task
seen before by this layer on this rank, kept detached (no gradient flows into the remembered side).
The remembered fits live on the layer (``align_memory``), are updated after every micro-batch with the
fits of the tasks present, and are not part of the adapter or of a checkpoint (a resumed run rebuilds
them from its next micro-batches). Before any other task was seen, the term is 0 (never NaN).

The term is added by rlora's training loop (:func:`rlora.train.batches.forward_loss`, every path: Ray or
local, ZeRO 0-3, gradient checkpointing, bf16 autocast). A Hugging Face ``Trainer`` driving
``rlora.get_adapter_model`` computes its own loss and so trains ``align`` as plain LoRA.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

EPS = 1e-8
_ACTIVE: list["AlignmentRecorder"] = []


def gaussian_fit(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ [r], σ² [r]) of the tokens z [n, r], n ≥ 2: the mean and the unbiased per-component variance."""
    return z.mean(dim=0), z.var(dim=0, unbiased=True)


def symmetric_kl(mu_p: torch.Tensor, var_p: torch.Tensor, mu_q: torch.Tensor, var_q: torch.Tensor,
                 eps: float = EPS) -> torch.Tensor:
    """D(p, q) = ½ (KL(p‖q) + KL(q‖p)) of two diagonal Gaussians (variances + ε), summed over components."""
    vp, vq = var_p + eps, var_q + eps
    d2 = (mu_p - mu_q) ** 2
    return 0.25 * (vp / vq + vq / vp - 2.0 + d2 * (1.0 / vp + 1.0 / vq)).sum(dim=-1)


def task_fits(z: torch.Tensor, tasks: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The Gaussian fit of every task with at least 2 tokens, for a stack of layers at once.

    z [G, n, r] (G layers sharing these n tokens) and task ids [n] -> (the tasks [K], μ [G, K, r], σ² [G, K, r]),
    in two passes (index_add of z, then of the centred squares; unbiased). A task with one token has no
    variance: it is left out (its divisor is clamped first, so no inf or NaN reaches the gradient)."""
    uniq, inv, counts = torch.unique(tasks, return_inverse=True, return_counts=True)
    dim = z.dim() - 2
    shape = (*z.shape[:dim], uniq.numel(), z.shape[-1])
    mu = z.new_zeros(shape).index_add(dim, inv, z) / counts.to(z.dtype)[:, None]
    dev = z - mu.index_select(dim, inv)
    var = z.new_zeros(shape).index_add(dim, inv, dev * dev) / (counts - 1).clamp(min=1).to(z.dtype)[:, None]
    keep = counts >= 2
    return uniq[keep].tolist(), mu[..., keep, :], var[..., keep, :]


def mean_pair_term(mu: torch.Tensor, var: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The mean of D over the K(K−1)/2 pairs of fits μ, σ² [..., K, r] (K ≥ 2) -> [...]."""
    k = mu.shape[-2]
    # every pair at once: p = [..., K, 1, r] against q = [..., 1, K, r] -> D [..., K, K]
    d = symmetric_kl(mu.unsqueeze(-2), var.unsqueeze(-2), mu.unsqueeze(-3), var.unsqueeze(-3), eps)
    a, b = torch.triu_indices(k, k, 1, device=mu.device)
    return d[..., a, b].mean(dim=-1)


def memory_term(task: int, mu: torch.Tensor, var: torch.Tensor,
                memory: Optional[dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> Optional[torch.Tensor]:
    """A lone task's fit (μ, σ² [r]) against the remembered fits of the other tasks: the mean of D, or None."""
    others = [m for t, m in sorted((memory or {}).items()) if t != task]
    if not others:
        return None
    mem_mu, mem_var = (torch.stack(x).to(mu.device, mu.dtype) for x in zip(*others))
    return symmetric_kl(mu, var, mem_mu, mem_var).mean()


def layer_alignment(z: torch.Tensor, tasks: torch.Tensor,
                    memory: Optional[dict[int, tuple[torch.Tensor, torch.Tensor]]] = None
                    ) -> tuple[Optional[torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """One layer's term from its real tokens' features z [n, r] and their task ids [n].

    Returns (the mean of D over the pairs, or None without a pair; the fits of the tasks present). With
    fewer than two tasks present, the pairs are (present task, remembered task) from ``memory``
    (task -> detached (μ, σ²)), other tasks only."""
    ids, mu, var = task_fits(z.unsqueeze(0), tasks)
    fits = {t: (mu[0, j], var[0, j]) for j, t in enumerate(ids)}
    if len(ids) >= 2:
        return mean_pair_term(mu[0], var[0]), fits
    if len(ids) == 1:
        return memory_term(ids[0], mu[0, 0], var[0, 0], memory), fits
    return None, fits


class AlignmentRecorder:
    """Collects the rank-space features of every Align-LoRA layer during one forward (the layers call
    :meth:`add` while a recorder is open, see :func:`record_alignment`) and turns them into the loss.

    ``attention_mask`` [b, L] and ``task_ids`` [b] describe the batch; a layer's features u [b·k, r]
    cover the last k ≤ L positions of every sample (k = L for decoder layers). Layers that cover the same
    positions (every decoder layer) are fitted together, as one stack: a few tensor operations per
    micro-batch, not per layer and task pair."""

    def __init__(self, attention_mask: torch.Tensor, task_ids: torch.Tensor):
        self.mask = attention_mask.bool()
        self.task_ids = task_ids.reshape(-1).long()
        self.features: dict[torch.nn.Module, list[torch.Tensor]] = {}

    def add(self, layer: torch.nn.Module, u: torch.Tensor) -> None:
        self.features.setdefault(layer, []).append(u)

    def _positions(self, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """For features of ``rows`` = b·k tokens: the real-token mask [b·k] and each token's task id [b·k]."""
        b, length = self.mask.shape
        if self.task_ids.numel() != b or rows % b or rows // b > length:
            raise ValueError(f"Align-LoRA: layer features of {rows} tokens do not fit the batch of {b} samples x "
                             f"{length} positions and {self.task_ids.numel()} task ids: pass one task id per sample")
        k = rows // b
        mask = self.mask[:, length - k:].reshape(-1).to(device)
        tasks = self.task_ids.to(device)[:, None].expand(b, k).reshape(-1)
        return mask, tasks

    def _features(self, layer, parts: list[torch.Tensor]) -> torch.Tensor:
        """z = u / s [b·k·parts, r] in fp32 at least (D is invariant to the common factor s, up to ε)."""
        if torch.is_grad_enabled() and layer.lora_A.requires_grad and not all(p.requires_grad for p in parts):
            raise RuntimeError("Align-LoRA's alignment loss got features without a gradient: re-entrant "
                               "gradient checkpointing runs the forward without autograd; use "
                               "trainer.gradient_checkpointing or rlora.enable_gradient_checkpointing "
                               "(non-re-entrant)")
        u = parts[0] if len(parts) == 1 else torch.cat(parts)
        z = u.to(torch.promote_types(u.dtype, torch.float32))
        return z / layer.scaling if layer.scaling != 0 else z

    def loss(self) -> torch.Tensor:
        """The mean over layers of each layer's term (0 when no layer has a pair); updates every layer's
        remembered fits (detached) with the fits of this batch's tasks."""
        groups: dict[tuple, list] = {}
        for layer, parts in self.features.items():
            groups.setdefault(tuple(p.shape[0] for p in parts), []).append((layer, parts))
        terms = []
        for rows, members in groups.items():
            layers = [layer for layer, _ in members]
            z = torch.stack([self._features(layer, parts) for layer, parts in members])     # [G, rows, r]
            masks, tasks = zip(*(self._positions(n, z.device) for n in rows))
            mask, tasks = torch.cat(masks), torch.cat(tasks)
            ids, mu, var = task_fits(z[:, mask], tasks[mask])                                # [G, K, r]
            if len(ids) >= 2:
                terms.append(mean_pair_term(mu, var))
            elif len(ids) == 1:
                lone = [memory_term(ids[0], mu[g, 0], var[g, 0], layer.align_memory) for g, layer in enumerate(layers)]
                terms.extend(t.reshape(1) for t in lone if t is not None)
            mu_d, var_d = mu.detach(), var.detach()
            for g, layer in enumerate(layers):
                layer.align_memory.update({t: (mu_d[g, j], var_d[g, j]) for j, t in enumerate(ids)})
        if not terms:
            return torch.zeros(())
        return torch.cat(terms).mean()


def active_recorder() -> Optional[AlignmentRecorder]:
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def record_alignment(model: torch.nn.Module, attention_mask: torch.Tensor,
                     task_ids: torch.Tensor) -> Iterator[Optional[AlignmentRecorder]]:
    """Open a recorder for the forward inside the block when ``model`` (or the module a DeepSpeed engine
    wraps) carries Align-LoRA adapters, is in training mode and gradients are on; else yields None."""
    root = getattr(model, "module", model)
    cfg = getattr(root, "rlora_config", None)
    if cfg is None or cfg.method != "align" or not root.training or not torch.is_grad_enabled():
        yield None
        return
    rec = AlignmentRecorder(attention_mask, task_ids)
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.pop()
