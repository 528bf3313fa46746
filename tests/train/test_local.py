"""The single-process training loop (no Ray, no DeepSpeed) on a tiny random Llama with the SmolLM2
tokenizer and synthetic task folders."""
import math

import pytest
import torch

from helpers import run_config
from rlora.config import ConfigError
from rlora.train.local import train_local


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer random Llama with the SmolLM2 vocabulary and an untied, enlarged output layer.

    With the default init (std 0.02) the logits ``W_out · RMSNorm(h)`` are bounded near 0 whatever the
    adapters do, so the loss cannot leave ln(V); a larger output layer makes the answers learnable.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlora.models import load_tokenizer

    out = tmp_path_factory.mktemp("learnable-llama")
    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def cfg_for(model_dir, data_dir, tmp_path, **overrides):
    base = dict(trainer__max_steps=30, trainer__learning_rate=1e-2, trainer__logging_steps=10,
                trainer__per_device_train_batch_size=4, mlflow__enabled=False, eval__max_examples_per_task=4)
    base.update(overrides)
    return run_config(model_dir, data_dir, tmp_path, **base)


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "hydra", "rlora", "mtl"])
def test_loss_falls_and_results(model_dir, task_dir, tmp_path, method):
    cfg = cfg_for(model_dir, task_dir, tmp_path, adapter__method=method)
    out = train_local(cfg, progress=False)
    losses = out["train_loss"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert out["tasks"] == ["parity", "sign", "size"]
    assert set(out["results_after"]) == {"parity", "sign", "size"}
    assert all(r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0 for r in out["results_after"].values())
    assert out["results_before"] is None
    n_trainable = sum(p.numel() for p in out["model"].parameters() if p.requires_grad)
    assert out["trainable_params"] == n_trainable > 0
    assert out["train_tokens_per_s"] > 0 and out["time_to_first_step_s"] > 0
    assert len(out["task_loss"]) == 30 and all(len(row) == 3 for row in out["task_loss"])
    assert not out["model"].training
    # the caller's config is left alone; the returned one names the tasks
    assert cfg.adapter.tasks == [] and out["config"]["adapter"]["tasks"] == out["tasks"]


def test_same_seed_same_run_other_seed_differs(model_dir, task_dir, tmp_path):
    kw = dict(trainer__max_steps=8, adapter__dropout=0.1, eval__max_examples_per_task=2)
    a = train_local(cfg_for(model_dir, task_dir, tmp_path, **kw), progress=False)
    b = train_local(cfg_for(model_dir, task_dir, tmp_path, **kw), progress=False)
    c = train_local(cfg_for(model_dir, task_dir, tmp_path, trainer__seed=8, **kw), progress=False)
    assert a["train_loss"] == b["train_loss"]
    sa, sb, sc = adapter_state(a["model"]), adapter_state(b["model"]), adapter_state(c["model"])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["results_after"] == b["results_after"]
    assert a["train_loss"] != c["train_loss"]
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("method", ["lora", "rlora"])
def test_eval_before_is_the_base_model(model_dir, task_dir, tmp_path, method):
    """Zero-initialised B (lora) and R-LoRA's zero-start offset leave the base model unchanged at step 0."""
    from rlora.data import evaluate_tasks, load_tasks
    from rlora.models import load_base_model, load_tokenizer

    cfg = cfg_for(model_dir, task_dir, tmp_path, adapter__method=method, trainer__max_steps=2)
    out = train_local(cfg, progress=False, eval_before=True)
    base, tok = load_base_model(str(model_dir)), load_tokenizer(str(model_dir))
    dev = load_tasks(cfg.data, "dev")
    ref = evaluate_tasks(base, tok, dev, [], max_length=cfg.data.max_length, max_examples_per_task=4,
                         batch_size=cfg.trainer.per_device_eval_batch_size, progress=False)
    for task, r in ref.items():
        got = out["results_before"][task]
        assert got["correct"] == r["correct"] and got["n"] == r["n"] == 4
        assert got["loss"] == pytest.approx(r["loss"], rel=1e-4)
    # two optimizer steps moved the adapter: the losses after differ from before
    assert any(out["results_after"][t]["loss"] != r["loss"] for t, r in ref.items())


def test_accumulation_schedule_and_dynamic_sampler(model_dir, task_dir, tmp_path):
    cfg = cfg_for(model_dir, task_dir, tmp_path, adapter__method="mtl", trainer__max_steps=12,
                  trainer__gradient_accumulation_steps=2, trainer__per_device_train_batch_size=2,
                  trainer__warmup_ratio=0.25, sampler__strategy="dynamic", sampler__dynamic_interval=4,
                  sampler__dynamic_window=2, eval__every_n_steps=6)
    out = train_local(cfg, progress=False)
    assert out["total_steps"] == 12 and len(out["train_loss"]) == 12
    hist = out["sampler_history"]
    # dynamic_interval counts optimizer steps; the sampler's own step counts micro-batches (12 x 2 = 24):
    # a re-weighting every 4 optimizer steps = 8 micro-batches (0: the initial probabilities)
    assert [h["step"] for h in hist] == [0, 8, 16, 24]
    assert out["config"]["sampler"]["dynamic_interval"] == 4
    # the loss ratios need 2W = 4 observations (one per optimizer step): there at the first re-weighting
    assert hist[0]["probabilities"] != hist[1]["probabilities"]
    assert all(abs(sum(h["probabilities"]) - 1) < 1e-9 for h in hist)
    assert [s for s, _ in out["eval_history"]] == [6]
    assert set(out["eval_history"][0][1]) == {"parity", "sign", "size"}


def test_epoch_budget_sets_the_step_count(model_dir, task_dir, tmp_path):
    cfg = cfg_for(model_dir, task_dir, tmp_path, trainer__max_steps="null", trainer__num_train_epochs=0.25,
                  sampler__strategy="round_robin", eval__max_examples_per_task=1)
    out = train_local(cfg, progress=False)
    # 3 tasks x 48 rows, a quarter epoch each = 36 rows, 4 per step, round robin -> 9 steps
    assert out["total_steps"] == len(out["train_loss"]) == 9


def test_task_list_mismatch_is_one_line_error(model_dir, task_dir, tmp_path):
    cfg = cfg_for(model_dir, task_dir, tmp_path, adapter__tasks=["parity", "size", "sign"])
    with pytest.raises(ConfigError) as err:
        train_local(cfg, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "adapter.tasks" in msg and "same order" in msg


def test_progress_lines(model_dir, task_dir, tmp_path, capsys):
    cfg = cfg_for(model_dir, task_dir, tmp_path, trainer__max_steps=4, trainer__logging_steps=2,
                  eval__max_examples_per_task=1)
    train_local(cfg, progress=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[rlora] step")]
    assert len(lines) == 2 and "4/4" in lines[-1] and "tok/s" in lines[-1]

