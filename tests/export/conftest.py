"""Fixtures for the export tests: a tiny random Llama saved as a Hugging Face folder (with the real
SmolLM2 tokenizer beside it, so PEFT and transformers load it from disk), synthetic task data, and
saved adapters of every method with perturbed (non-trivial) parameters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TASKS = ["alpha", "beta"]


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlora.models import load_tokenizer

    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)
    return folder


def synthetic_rows(task: str, n: int, free_form: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        if free_form:
            rows.append({"id": f"{task}-{i}", "input": f"Repeat the word number {i} of task {task}.",
                         "options": None, "target": f"word{i}"})
        else:
            rows.append({"id": f"{task}-{i}", "input": f"In task {task}, is the number {i * 7 + 3} odd?",
                         "options": ["yes", "no", "maybe"], "target": "yes" if (i * 7 + 3) % 2 else "no"})
    return rows


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for t in TASKS:
        (root / t).mkdir()
        for split, n in (("train", 4), ("dev", 6)):
            rows = [dict(r, id=f"{split}-{r['id']}") for r in synthetic_rows(t, n)]
            (root / t / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_adapter_model(base_dir: Path, method: str, seed: int = 1, perturb: float = 0.2, router: bool = True):
    """Base model + injected adapter whose trainable parameters are all perturbed by N(0, perturb²)."""
    import rlora

    model = rlora.load_base_model(str(base_dir))
    cfg = rlora.AdapterConfig(method=method, r=4, num_heads=3, tasks=list(TASKS), dropout=0.0, alpha=8.0)
    rlora.inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (router or "router" not in name):
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    return model.eval()


@pytest.fixture(scope="session")
def adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    import rlora

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for method in ("lora", "mtl", "hydra", "rlora"):
        out[method] = rlora.save_adapter(make_adapter_model(base_dir, method), root / method)
    return out


def sample_ids(tokenizer, texts=("In task beta, is the number 10 odd?", "Hello there, general")) -> tuple:
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def adapter_logits(base_dir: Path, adapter: Path, task: int | None, ids, mask) -> torch.Tensor:
    import rlora

    model = rlora.load_base_model(str(base_dir))
    rlora.load_adapter(model, adapter)
    with torch.no_grad(), rlora.task_ids(None if task is None else torch.full((ids.shape[0],), task)):
        return model(input_ids=ids, attention_mask=mask).logits
