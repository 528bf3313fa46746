"""Batch padding and per-task token losses."""
import pytest
import torch
import torch.nn.functional as F

from rlora.data import IGNORE_INDEX, collate, per_task_loss


def test_collate_right_pads():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}]
    b = collate(feats, pad_token_id=2, task_ids=[1, 0])
    assert b["input_ids"].tolist() == [[5, 6, 7], [9, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert b["task_ids"].dtype == torch.long and b["task_ids"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="2 rows but 1 task ids"):
        collate(feats, 2, [0])
    with pytest.raises(ValueError, match="empty batch"):
        collate([], 2, [])


def _naive(logits, labels, task_ids, num_tasks):
    sums, counts = [0.0] * num_tasks, [0] * num_tasks
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            sums[task_ids[b]] += -torch.log_softmax(logits[b, t - 1].double(), -1)[y].item()
            counts[task_ids[b]] += 1
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def test_per_task_loss_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    B, L, V, T = 5, 7, 11, 4
    logits = torch.randn(B, L, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[torch.rand(B, L, generator=g) < 0.4] = IGNORE_INDEX
    task_ids = torch.tensor([0, 2, 2, 1, 0])
    loss_sum, count = per_task_loss(logits, labels, task_ids, T)
    ref_sum, ref_count = _naive(logits.detach(), labels, task_ids.tolist(), T)
    assert torch.allclose(loss_sum.double(), ref_sum, atol=1e-5) and count.tolist() == ref_count.tolist()
    assert loss_sum[3] == 0 and count[3] == 0
    batch_mean = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss_sum.sum() / count.sum(), batch_mean, atol=1e-6)
    loss_sum.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 2\)"):
        per_task_loss(logits, labels, task_ids, 2)
