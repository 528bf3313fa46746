"""Fixtures for the trainer tests: a tiny random Llama with the real SmolLM2 tokenizer, synthetic
multi-task folders in the interchange format, and one local Ray instance shared by the module."""
from pathlib import Path

import pytest
import torch

from helpers import write_tasks


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlora.models import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, logging_level="ERROR")
    yield ray
    ray.shutdown()
