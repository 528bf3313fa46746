"""Trainer.train_step in one process, against the formula in its docstring: the accumulated gradient of G
micro-batches is the per-token mean over the whole step (times W, which DeepSpeed's average over ranks takes
back), the returned losses are the step's per-task and overall token means, and the step's bookkeeping.

The engine here does what a DeepSpeed engine does with a loss (``backward`` divides it by G; ``step`` is
called after every micro-batch); a tiny random Llama is the model and a fixed list of slots the sampler."""
import hashlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_llama
from rlora.data import IGNORE_INDEX
from rlora.train.loop import Trainer

X = IGNORE_INDEX
# task 0: answers of 1 and 3 tokens, task 1: an answer of 2 tokens; task 2 never sampled
TOKENIZED = {"t0": [{"input_ids": [3, 4, 5], "labels": [X, X, 5]},
                    {"input_ids": [6, 7, 8, 9, 10], "labels": [X, X, 8, 9, 10]}],
             "t1": [{"input_ids": [11, 12, 13, 14], "labels": [X, X, 13, 14]}],
             "t2": [{"input_ids": [15, 16], "labels": [X, 16]}]}
NAMES = ["t0", "t1", "t2"]


class Engine:
    def __init__(self, model, ga):
        self.module, self.ga, self.device = model, ga, torch.device("cpu")
        self.backwards = self.steps = 0
        self.autocast_seen = []
        model.register_forward_pre_hook(lambda m, a: self.autocast_seen.append(torch.is_autocast_enabled("cpu")))

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        self.backwards += 1
        (loss / self.ga).backward()

    def step(self):
        self.steps += 1


def trainer(slots_per_batch, ga, world=1, bf16=False):
    model = tiny_llama(vocab=32, hidden=32, layers=1).train()
    queue = list(slots_per_batch)
    data = SimpleNamespace(names=NAMES, tokenized=TOKENIZED, pad_id=0,
                           sampler=SimpleNamespace(next_batch=lambda: queue.pop(0)))
    cfg = SimpleNamespace(trainer=SimpleNamespace(gradient_accumulation_steps=ga, bf16=bf16))
    tr = Trainer(cfg, SimpleNamespace(rank=0, world_size=world), {})
    tr.data, tr.engine = data, Engine(model, ga)
    return tr, model


def reference(model, slots):
    """Summed next-token NLL per task and token counts over every row of the step, each row on its own."""
    sums, counts, total = torch.zeros(3), torch.zeros(3), 0.0
    for t, e in slots:
        row = TOKENIZED[NAMES[t]][e]
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        nll = F.cross_entropy(logits[:-1], torch.tensor(row["labels"][1:]), ignore_index=X, reduction="sum")
        total = total + nll
        sums[t] += nll.item()
        counts[t] += sum(1 for v in row["labels"][1:] if v != X)
    return total, sums, counts


@pytest.mark.parametrize("world", [1, 2])
def test_accumulated_gradient_is_the_step_token_mean(world):
    batches = [[(0, 0)], [(0, 1), (1, 0)]]                 # 1 answer token, then 5: a per-micro-batch mean differs
    tr, model = trainer(batches, ga=2, world=world)
    task_loss, step_loss = tr.train_step()

    ref_model = tiny_llama(vocab=32, hidden=32, layers=1).train()
    total, sums, counts = reference(ref_model, [s for b in batches for s in b])
    (total / counts.sum() * world).backward()               # DeepSpeed's mean over W ranks takes back W
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    assert tr.engine.backwards == tr.engine.steps == 2

    assert task_loss[0] == pytest.approx(sums[0].item() / 4, rel=1e-5)
    assert task_loss[1] == pytest.approx(sums[1].item() / 2, rel=1e-5)
    assert math.isnan(task_loss[2])                          # absent task
    assert step_loss == pytest.approx(sums.sum().item() / 6, rel=1e-5)
    assert tr.step == 1 and tr.loss_hist == [step_loss] and tr.task_hist == [task_loss]


def test_step_bookkeeping_and_bf16():
    batches = [[(2, 0)], [(0, 0), (1, 0)], [(0, 1)]]
    tr, _ = trainer(batches, ga=3, bf16=True)
    tr.train_step()
    order = ""
    for b in batches:
        order = hashlib.sha256((order + repr(b)).encode()).hexdigest()
    assert tr.data_order == order
    assert tr.clock.window_tokens == 2 + 3 + 4 + 5             # real (unpadded) tokens of the step
    assert tr.engine.autocast_seen == [True, True, True]
    tr2, _ = trainer([[(0, 0)]], ga=1)
    tr2.train_step()
    assert tr2.engine.autocast_seen == [False]


def test_a_step_without_answer_tokens_has_zero_loss():
    empty = {"input_ids": [3, 4], "labels": [X, X]}
    tr, model = trainer([[(0, 0)]], ga=1)
    tr.data.tokenized = {"t0": [empty], "t1": [empty], "t2": [empty]}
    task_loss, step_loss = tr.train_step()
    assert step_loss == 0.0 and all(math.isnan(v) for v in task_loss)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_a_step_of_one_answer_token_and_the_step_counter():
    """One answer token: its task's loss and the step loss are that token's NLL and the gradient is its
    gradient (no floor above 1 token); a second step counts 2."""
    tr, model = trainer([[(0, 0)], [(1, 0)]], ga=1)
    task_loss, step_loss = tr.train_step()
    ref_model = tiny_llama(vocab=32, hidden=32, layers=1).train()
    total, sums, counts = reference(ref_model, [(0, 0)])
    assert counts.tolist() == [1, 0, 0]
    assert task_loss[0] == pytest.approx(total.item(), rel=1e-5) and step_loss == pytest.approx(total.item(), rel=1e-5)
    total.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    tr.train_step()
    assert tr.step == 2 and len(tr.loss_hist) == 2


def test_the_alignment_term_of_a_step_is_the_mean_over_its_micro_batches():
    """Align-LoRA: ``align_loss`` is the unweighted term averaged over the step's micro-batches (and ranks),
    here one two-task micro-batch and one lone-task micro-batch (paired with the remembered fits)."""
    import rlora
    from rlora.train.batches import forward_loss, left_padded_batch

    def align_model():
        model = rlora.inject(tiny_llama(vocab=32, hidden=32, layers=1), rlora.AdapterConfig(method="align", r=2))
        return model.train()

    batches = [[(0, 0), (1, 0)], [(0, 1)]]
    tr, _ = trainer(batches, ga=2)
    tr.engine = Engine(align_model(), 2)
    assert tr.align_loss is None
    tr.train_step()
    ref, terms = align_model(), []
    for slots in batches:
        b = left_padded_batch([TOKENIZED[NAMES[t]][e] for t, e in slots], 0, [t for t, _ in slots])
        forward_loss(ref, b, 3)
        terms.append(b["align_loss"])
    assert min(terms) > 0 and terms[0] != terms[1]
    assert tr.align_loss == pytest.approx(sum(terms) / 2, rel=1e-6)
