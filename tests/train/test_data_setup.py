"""The "set up data and sampler" phase (rlora.train.data_setup) reads the data and sampler knobs of the run
config: task weights reach the sampler, and the prompt template, max_length and chat template shape the
tokenised training rows."""
import numpy as np
import pytest

from helpers import run_config
from rlora.sampler import SamplerError
from rlora.train.data_setup import build_sampler, load_train_data

NAMES = ["parity", "sign", "size"]


@pytest.fixture(scope="module")
def tokenizer():
    from rlora.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def cfg_for(tiny_model_dir, task_dir, tmp_path, **kw):
    return run_config(tiny_model_dir, task_dir, tmp_path, mlflow__enabled=False, **kw)


def weighted(strategy):
    return {"sampler__strategy": strategy,
            "data__tasks": "[{name: parity, weight: 3}, {name: sign}, {name: size, weight: 0.5}]"}


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "uniform"])
def test_task_weights_reach_the_sampler(tiny_model_dir, task_dir, tmp_path, strategy):
    """data.tasks[].weight (1 where unset) multiplies the strategy's probabilities: p_t ~ q_t w_t."""
    sizes = [10, 30, 60]
    plain = build_sampler(cfg_for(tiny_model_dir, task_dir, tmp_path, sampler__strategy=strategy), sizes, NAMES, 0, 1)
    got = build_sampler(cfg_for(tiny_model_dir, task_dir, tmp_path, **weighted(strategy)), sizes, NAMES, 0, 1)
    q = plain.probabilities * np.array([3.0, 1.0, 0.5])
    np.testing.assert_allclose(got.probabilities, q / q.sum(), rtol=1e-12)
    if strategy == "proportional":  # [0.1, 0.3, 0.6] x [3, 1, 0.5] is flat
        np.testing.assert_allclose(got.probabilities, [1 / 3] * 3, rtol=1e-12)


@pytest.mark.parametrize("strategy", ["round_robin", "probabilities"])
def test_task_weights_are_refused_with_round_robin_and_probabilities(tiny_model_dir, task_dir, tmp_path, strategy):
    kw = weighted(strategy)
    if strategy == "probabilities":
        kw["sampler__probabilities"] = "{parity: 0.2, sign: 0.3, size: 0.5}"
    with pytest.raises(SamplerError, match=rf"data.tasks\[\].weight does not combine with sampler.strategy={strategy}"):
        build_sampler(cfg_for(tiny_model_dir, task_dir, tmp_path, **kw), [10, 30, 60], NAMES, 0, 1)


def decoded_rows(tokenizer, cfg, task):
    data = load_train_data(cfg, tokenizer, 0, 1)
    return data, [tokenizer.decode(r["input_ids"]) for r in data.tokenized[task]]


def test_prompt_template_shapes_the_training_prompts(tokenizer, tiny_model_dir, task_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, task_dir, tmp_path, data__max_length=256, data__use_chat_template=False,
                  data__tasks="[{name: parity, prompt_template: 'TASK {task} | {input}'}, {name: sign}]")
    data, parity = decoded_rows(tokenizer, cfg, "parity")
    _, sign = decoded_rows(tokenizer, cfg, "sign")
    assert data.names == ["parity", "sign"]
    assert all(t.startswith("TASK parity | Is ") for t in parity)
    assert not any("TASK" in t for t in sign) and all("Options:" in t for t in sign)


def test_max_length_truncates_the_training_rows(tokenizer, tiny_model_dir, task_dir, tmp_path):
    short = load_train_data(cfg_for(tiny_model_dir, task_dir, tmp_path, data__max_length=24), tokenizer, 0, 1)
    full = load_train_data(cfg_for(tiny_model_dir, task_dir, tmp_path, data__max_length=512), tokenizer, 0, 1)
    longest = max(len(r["input_ids"]) for rows in full.tokenized.values() for r in rows)
    assert longest > 24 and all(n == 0 for n in full.truncated.values())
    assert max(len(r["input_ids"]) for rows in short.tokenized.values() for r in rows) == 24
    assert all(n == 48 for n in short.truncated.values())  # every row of the three tasks is cut


def test_use_chat_template_switches_the_prompt_layout(tokenizer, tiny_model_dir, task_dir, tmp_path):
    _, chat = decoded_rows(tokenizer, cfg_for(tiny_model_dir, task_dir, tmp_path, data__max_length=256), "sign")
    _, plain = decoded_rows(tokenizer, cfg_for(tiny_model_dir, task_dir, tmp_path, data__max_length=256,
                                               data__use_chat_template=False), "sign")
    assert all("<|im_start|>user\n" in t and "<|im_start|>assistant\n" in t for t in chat)
    assert all("<|im_start|>" not in t and "\nAnswer: " in t for t in plain)
