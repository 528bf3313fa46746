"""Pad encoded rows into a batch of tensors."""
from __future__ import annotations

from typing import Sequence

import torch

from .tokenization import IGNORE_INDEX


def collate(features: Sequence[dict], pad_token_id: int, task_ids: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row.

    Returns ``input_ids`` [B, L] (``pad_token_id`` after the row), ``attention_mask`` [B, L] (1 on real
    tokens), ``labels`` [B, L] (-100 on prompt and padding) and ``task_ids`` [B] (int64).
    """
    if not features:
        raise ValueError("collate got an empty batch: pass at least one encoded row")
    tids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
    if tids.numel() != len(features):
        raise ValueError(f"collate got {len(features)} rows but {tids.numel()} task ids: pass one task id per row")
    width = max(len(f["input_ids"]) for f in features)
    batch = len(features)
    input_ids = torch.full((batch, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["labels"]) != n:
            raise ValueError(f"row {i}: {n} input_ids but {len(f['labels'])} labels: encode rows with encode_example")
        input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": tids}
