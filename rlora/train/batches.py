"""Training micro-batches: left-padded so that every row's answer ends at the last position, and the
LM head (a 49k-vocabulary matmul) runs only on the last ``K + 1`` positions that predict answer tokens."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from ..data import IGNORE_INDEX, collate, per_task_loss


def left_padded_batch(features: Sequence[dict], pad_token_id: int, task_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """``collate`` (right padding) rolled to left padding, with position ids and ``logits_to_keep``.

    Returns input_ids, attention_mask, labels [B, L], position_ids [B, L], task_ids [B] and
    ``keep`` = 1 + the longest answer (tokens with a label), the number of tail positions whose
    logits are needed for the loss.
    """
    b = collate(features, pad_token_id, task_ids)
    mask = b["attention_mask"]
    width = mask.shape[1]
    shift = width - mask.sum(dim=1, keepdim=True)
    idx = (torch.arange(width).unsqueeze(0) - shift) % width
    out = {k: torch.gather(b[k], 1, idx) for k in ("input_ids", "attention_mask", "labels")}
    out["position_ids"] = (out["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    out["task_ids"] = b["task_ids"]
    answer = (out["labels"] != IGNORE_INDEX).sum(dim=1).max().item()
    out["keep"] = min(width, int(answer) + 1)
    out["tokens"] = int(mask.sum())
    return out


def next_micro_batch(sampler, tokenized: dict, names: list[str], pad_token_id: int, device) -> dict:
    """The sampler's next (task, example) slots for this rank as a left-padded batch on ``device``."""
    slots = sampler.next_batch()
    feats = [tokenized[names[ti]][ei] for ti, ei in slots]
    batch = left_padded_batch(feats, pad_token_id, [ti for ti, _ in slots])
    batch["slots"] = slots
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def answer_tokens(batch: dict) -> int:
    """Answer tokens (positions that carry loss) in a micro-batch from :func:`left_padded_batch`."""
    return int((batch["labels"][:, -batch["keep"]:][:, 1:] != IGNORE_INDEX).sum())


def forward_loss(model, batch: dict, num_tasks: int, normalizer: float | None = None, autocast: bool = False):
    """The answer-token loss of a micro-batch, plus (loss_sum, count) per task for logging/balancing.

    The loss is ``sum of token losses / normalizer`` (default: this micro-batch's answer tokens, the
    mean). The training loop passes the optimizer step's answer tokens over all micro-batches and
    ranks, scaled back by the engine's averaging, so that the gradient is the per-token mean of the
    whole step whatever the split into micro-batches and ranks. ``autocast``: the forward in bfloat16
    autocast (fp32 weights); the loss is always taken in fp32.

    Align-LoRA in training adds ``λ · L_align`` of this micro-batch (:mod:`rlora.alignment`; λ is
    ``adapter.align_lambda``) and records the unweighted ``L_align`` as ``batch["align_loss"]`` (a float).
    """
    from ..alignment import record_alignment
    from ..context import task_ids

    amp = torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    with task_ids(batch["task_ids"]), amp, record_alignment(model, batch["attention_mask"], batch["task_ids"]) as align:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=batch["keep"], use_cache=False)
    labels = batch["labels"][:, -batch["keep"]:].to(out.logits.device)
    loss_sum, count = per_task_loss(out.logits, labels, batch["task_ids"], num_tasks)
    loss = loss_sum.sum() / (normalizer if normalizer is not None else count.sum().clamp(min=1))
    if align is not None:
        term = align.loss().to(loss.device)
        loss = loss + getattr(model, "module", model).rlora_config.align_lambda * term
        batch["align_loss"] = float(term.detach())
    return loss, loss_sum.detach(), count.detach()
