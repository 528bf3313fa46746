"""Fixtures for the data tests: synthetic task folders, the real SmolLM2 tokenizer/model, a tiny Llama."""
import pytest
import torch
from .synthetic_rows import row, write_jsonl


@pytest.fixture
def make_task(tmp_path):
    """make_task(name, train_rows, dev_rows) -> folder, with synthetic yes/no rows by default."""
    def _make(name="alpha", n_train=4, n_dev=2, root=None):
        root = root or tmp_path / "data"
        folder = root / name
        write_jsonl(folder / "train.jsonl", [row(name, i, target="yes" if i % 2 else "no") for i in range(n_train)])
        write_jsonl(folder / "dev.jsonl", [row(name, 100 + i) for i in range(n_dev)])
        return folder
    return _make


@pytest.fixture(scope="session")
def smol_tokenizer():
    from rlora.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smol_model():
    from rlora.models import load_base_model

    return load_base_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer random Llama with the SmolLM2 vocabulary (fast, deterministic)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()
