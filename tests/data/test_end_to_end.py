"""mtl_cpu6 end to end with the real SmolLM2-135M: load, tokenise, batch, per-task loss, scoring."""
from pathlib import Path

import pytest
import torch

from rlora.config import DataConfig
from rlora.data import collate, evaluate_multiple_choice, load_tasks, per_task_loss, tokenize_tasks

MTL_CPU6 = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mtl_cpu6").resolve()
TASKS = ["arc_easy", "banking77", "boolq", "openbookqa", "sst2", "tweet_emotion"]

pytestmark = pytest.mark.skipif(not MTL_CPU6.is_dir(), reason=f"{MTL_CPU6} is absent (shared data not mounted)")


@pytest.fixture(scope="module")
def cpu6():
    cfg = DataConfig(path=str(MTL_CPU6))
    return load_tasks(cfg, "train"), load_tasks(cfg, "dev")


def test_all_tasks_load(cpu6):
    train, dev = cpu6
    assert list(train) == TASKS and list(dev) == TASKS
    assert all(len(train[t]) == 1000 and len(dev[t]) == 200 for t in TASKS)
    assert len(dev["banking77"][0].options) == 77


def test_tokenise_collate_and_per_task_loss(cpu6, smol_model, smol_tokenizer):
    train, _ = cpu6
    tok = tokenize_tasks(smol_tokenizer, {t: train[t][:2] for t in TASKS}, max_length=256)
    assert all(t.num_truncated == 0 for t in tok.values())
    for k, name in enumerate(TASKS):
        batch = collate(tok[name], smol_tokenizer.pad_token_id, [k, k])
        with torch.no_grad():
            out = smol_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"])
        loss_sum, count = per_task_loss(out.logits, batch["labels"], batch["task_ids"], len(TASKS))
        assert count[k] == sum(sum(1 for x in f["labels"] if x != -100) for f in tok[name])
        assert count.sum() == count[k] and torch.isfinite(loss_sum[k])
        assert torch.allclose(loss_sum[k] / count[k], out.loss, atol=1e-4)


def test_score_five_dev_examples_per_task(cpu6, smol_model, smol_tokenizer):
    _, dev = cpu6
    for k, name in enumerate(TASKS):
        res = evaluate_multiple_choice(smol_model, smol_tokenizer, dev[name][:5], batch_size=8, task_id=k)
        assert res["n"] == 5 and 0.0 <= res["accuracy"] <= 1.0
        assert 0.0 < res["loss"] < 20.0


def test_batched_scoring_equals_unbatched(cpu6, smol_model, smol_tokenizer):
    _, dev = cpu6
    for name in ("sst2", "arc_easy"):
        exs = dev[name][:3]
        batched = evaluate_multiple_choice(smol_model, smol_tokenizer, exs, batch_size=3, return_details=True)
        single = [evaluate_multiple_choice(smol_model, smol_tokenizer, [e], batch_size=1, return_details=True)
                  for e in exs]
        for got, one in zip(batched["scores"], single):
            assert got == pytest.approx(one["scores"][0], abs=1e-4)
