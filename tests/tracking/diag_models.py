"""Tiny adapter models and synthetic probe batches for the diagnostics tests."""
import torch

import rlora
from helpers import tiny_llama
from rlora.tracking.diagnostics import make_probe

TASKS = ["alpha", "beta", "gamma"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def adapter_model(method, heads=3, r=4, hidden=64, layers=2, targets=TARGETS, tasks=TASKS, **kw):
    model = tiny_llama(hidden=hidden, layers=layers)
    cfg = rlora.AdapterConfig(method=method, r=r, num_heads=heads, alpha=8, dropout=0.1, tasks=list(tasks),
                              target_modules=list(targets), **kw)
    return rlora.inject(model, cfg)


def synthetic_rows(tasks=TASKS, per_task=2, seed=0, vocab=128):
    """Random token rows of different lengths; the last 3 tokens of each row are the answer."""
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for t in tasks:
        rows[t] = []
        for _ in range(per_task):
            n = int(torch.randint(6, 14, (1,), generator=g))
            ids = torch.randint(1, vocab, (n,), generator=g).tolist()
            rows[t].append({"input_ids": ids, "labels": [-100] * (n - 3) + ids[-3:]})
    return rows


def probe_for(tasks=TASKS, per_task=2, seed=0):
    return make_probe(synthetic_rows(tasks, per_task, seed), list(tasks), pad_token_id=0, per_task=per_task)


def randomise(model, std=0.3, seed=1):
    """Give every adapter parameter a non-trivial random value (heads, router, mixing, Λ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rlora.adapter_layers(model):
            for name, p in layer.named_parameters():
                if not name.startswith("base"):
                    p.add_(torch.randn(p.shape, generator=g) * std)
    return model

