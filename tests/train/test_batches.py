"""rlora.train.batches: the left-padded micro-batch (exact tensors), its answer-token count, the batch the
sampler's slots make, and forward_loss (what it passes to the model, its normalisation, its sums, the Align-LoRA
term)."""
import pytest
import torch
import torch.nn.functional as F
from types import SimpleNamespace


from helpers import tiny_llama
from rlora.context import current_task_ids
from rlora.data import IGNORE_INDEX
from rlora.train.batches import answer_tokens, forward_loss, left_padded_batch, next_micro_batch

X = IGNORE_INDEX
# row 0: 3 tokens, 1 answer token; row 1: 5 tokens, 2 answer tokens
ROWS = [{"input_ids": [5, 6, 7], "labels": [X, X, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [X, X, X, 11, 12]}]


def test_left_padded_batch_exact():
    b = left_padded_batch(ROWS, pad_token_id=0, task_ids=[1, 0])
    assert b["input_ids"].tolist() == [[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[X, X, X, X, 7], [X, X, X, 11, 12]]
    assert b["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]   # padding clamped to 0
    assert b["task_ids"].tolist() == [1, 0]
    assert b["keep"] == 3 and b["tokens"] == 8                               # 1 + longest answer; real tokens
    assert all(b[k].dtype == torch.long for k in ("input_ids", "attention_mask", "labels", "position_ids"))


def test_keep_is_at_most_the_width():
    b = left_padded_batch([{"input_ids": [3, 4], "labels": [3, 4]}], pad_token_id=9, task_ids=[0])
    assert b["keep"] == 2 and b["tokens"] == 2 and b["position_ids"].tolist() == [[0, 1]]


def test_answer_tokens_counts_the_labelled_positions_in_the_kept_tail():
    b = left_padded_batch(ROWS, 0, [1, 0])
    assert answer_tokens(b) == 3
    assert answer_tokens(left_padded_batch(ROWS[:1], 0, [0])) == 1


def test_next_micro_batch_takes_the_samplers_slots_and_moves_tensors():
    tokenized = {"a": [ROWS[1], ROWS[0]], "b": [ROWS[0], ROWS[1]]}
    sampler = SimpleNamespace(next_batch=lambda: [(1, 0), (0, 0)])     # (task index, example index)
    b = next_micro_batch(sampler, tokenized, ["a", "b"], 0, torch.device("meta"))
    ref = left_padded_batch([ROWS[0], ROWS[1]], 0, [1, 0])
    assert b["slots"] == [(1, 0), (0, 0)] and b["keep"] == ref["keep"] and b["tokens"] == ref["tokens"]
    for k in ("input_ids", "attention_mask", "labels", "position_ids", "task_ids"):
        assert b[k].device.type == "meta" and b[k].shape == ref[k].shape, k


class Recorder(torch.nn.Module):
    """Records what forward_loss passes and returns fixed logits [B, keep, V]."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, **kw):
        self.seen = dict(kw, task_ids=current_task_ids(), autocast=torch.is_autocast_enabled("cpu"),
                         autocast_dtype=torch.get_autocast_dtype("cpu"))
        return SimpleNamespace(logits=self.logits * 1)


def test_forward_loss_passes_the_batch_and_normalises():
    b = left_padded_batch(ROWS, 0, [1, 0])
    logits = torch.randn(2, b["keep"], 16)
    m = Recorder(logits.clone())
    loss, s, c = forward_loss(m, b, num_tasks=2)
    for k in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(m.seen[k], b[k]), k
    assert m.seen["logits_to_keep"] == 3 and m.seen["use_cache"] is False
    assert m.seen["task_ids"].tolist() == [1, 0] and m.seen["autocast"] is False
    # reference: next-token cross-entropy on the kept tail, per task
    lab = b["labels"][:, -3:]
    nll = [F.cross_entropy(logits[r, :-1], lab[r, 1:], ignore_index=X, reduction="sum") for r in range(2)]
    assert c.tolist() == [2, 1]
    assert torch.allclose(s, torch.stack([nll[1], nll[0]]), atol=1e-6)
    assert torch.allclose(loss, (nll[0] + nll[1]) / 3, atol=1e-6)
    assert not s.requires_grad and not c.requires_grad and loss.requires_grad
    loss7, _, _ = forward_loss(m, b, num_tasks=2, normalizer=7.0)           # the step's token count
    assert torch.allclose(loss7, (nll[0] + nll[1]) / 7, atol=1e-6)


def test_forward_loss_of_one_answer_token_is_its_nll_and_of_none_is_zero():
    one = left_padded_batch(ROWS[:1], 0, [0])
    m = Recorder(torch.randn(1, one["keep"], 16))
    loss, _, c = forward_loss(m, one, num_tasks=1)
    assert c.tolist() == [1]
    assert torch.allclose(loss, F.cross_entropy(m.logits[0, :1].detach(), torch.tensor([7])), atol=1e-6)
    none = left_padded_batch([{"input_ids": [4, 5], "labels": [X, X]}], 0, [0])
    m0 = Recorder(torch.randn(1, none["keep"], 16))
    loss0, _, c0 = forward_loss(m0, none, num_tasks=1)
    assert c0.tolist() == [0] and loss0.item() == 0.0                        # not 0 / 0


def test_forward_loss_autocast_runs_the_forward_in_bfloat16():
    b = left_padded_batch(ROWS, 0, [1, 0])
    m = Recorder(torch.randn(2, b["keep"], 16))
    forward_loss(m, b, num_tasks=2, autocast=True)
    assert m.seen["autocast"] is True and m.seen["autocast_dtype"] == torch.bfloat16


def test_left_padding_gives_each_row_its_unpadded_loss():
    """A real (tiny, random) Llama: each row's per-task loss in the left-padded batch equals the loss of
    that row alone without padding, so padding, position ids and logits_to_keep line up."""
    model = tiny_llama(vocab=32, hidden=32, layers=1)
    b = left_padded_batch(ROWS, 0, [1, 0])
    _, s, c = forward_loss(model, b, num_tasks=2)
    alone = []
    for row in ROWS:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        alone.append(F.cross_entropy(logits[:-1], torch.tensor(row["labels"][1:]), ignore_index=X, reduction="sum"))
    assert c.tolist() == [2, 1]
    assert torch.allclose(s, torch.stack([alone[1], alone[0]]), atol=1e-5)


class _AlignLM(torch.nn.Module):
    """An embedding, one Align-LoRA layer as the LM head and the adapter config: what forward_loss needs."""

    def __init__(self, lam):
        super().__init__()
        import rlora
        from rlora.layers import AlignLoRALinear

        torch.manual_seed(0)
        self.rlora_config = rlora.AdapterConfig(method="align", r=2, alpha=4, dropout=0.0, align_lambda=lam)
        self.emb = torch.nn.Embedding(16, 6)
        self.head = AlignLoRALinear(torch.nn.Linear(6, 16), self.rlora_config)
        with torch.no_grad():
            self.head.lora_B.normal_()

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        return SimpleNamespace(logits=self.head(self.emb(input_ids))[:, -logits_to_keep:])


class _Engine(torch.nn.Module):
    """A DeepSpeed-engine-like wrapper: the model (and its config) is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kw):
        return self.module(**kw)


def test_forward_loss_adds_lambda_times_the_alignment_term_in_training_and_records_it():
    from rlora.alignment import AlignmentRecorder

    engine = _Engine(_AlignLM(lam=0.5))
    b, plain = left_padded_batch(ROWS, 0, [1, 0]), left_padded_batch(ROWS, 0, [1, 0])
    loss, s, c = forward_loss(engine.train(), b, num_tasks=2)
    loss0, s0, c0 = forward_loss(engine.eval(), plain, num_tasks=2)            # eval: no recorder, LoRA's loss
    m = engine.module
    ref = AlignmentRecorder(b["attention_mask"], b["task_ids"])
    ref.add(m.head, m.head.scaling * m.emb(b["input_ids"]).reshape(-1, 6) @ m.head.lora_A.t())
    term = ref.loss().item()
    assert term > 0.01 and "align_loss" not in plain
    assert b["align_loss"] == pytest.approx(term, rel=1e-5)
    assert loss.item() == pytest.approx(loss0.item() + 0.5 * term, rel=1e-5)
    assert torch.equal(s, s0) and torch.equal(c, c0)                          # the sums stay the LM loss's
    bare = left_padded_batch(ROWS, 0, [1, 0])
    assert forward_loss(m.train(), bare, num_tasks=2)[0].item() == loss.item()   # the model itself, not wrapped
    assert bare["align_loss"] == b["align_loss"]
