"""Injection into Hugging Face causal LMs, task ids, merge/unmerge (tiny random models: mechanics only)."""
import pytest
import torch

import rlora
from rlora.layers import AdapterError
from helpers import tiny_llama

METHODS = ["lora", "hydra", "rlora", "mtl", "align"]
TASKS = ["qa", "math", "sentiment"]


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


def perturb(model):
    """Training moves every adapter tensor away from its init; emulate that."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("family", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("method", METHODS)
def test_init_logits_equal_base(family, method):
    model = family()
    ids = torch.randint(0, 128, (3, 9))
    ref = model(ids).logits
    rlora.inject(model, rlora.AdapterConfig(method=method, tasks=TASKS))
    with rlora.task_ids([0, 1, 2]):
        got = model(ids).logits
    assert (got - ref).abs().max().item() <= 1e-5


def test_injects_every_target_and_freezes_base():
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method="hydra", target_modules=["q_proj", "down_proj"]))
    names = [n for n, _ in rlora.adapter_layers(model)]
    assert len(names) == 4 and all(n.endswith(("q_proj", "down_proj")) for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(any(k in n for k in ("lora_", "router")) for n in trainable)


def test_no_module_matched_is_a_clear_error():
    with pytest.raises(AdapterError, match=r"match no module of LlamaForCausalLM.*q_proj"):
        rlora.inject(tiny_llama(), rlora.AdapterConfig(target_modules=["c_attn"]))


def test_gpt2_conv1d_is_refused_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(AdapterError, match="is a Conv1D, not an nn.Linear"):
        rlora.inject(model, rlora.AdapterConfig(target_modules=["c_attn"]))


def test_mtl_needs_tasks():
    with pytest.raises(AdapterError, match="needs adapter.tasks"):
        rlora.inject(tiny_llama(), rlora.AdapterConfig(method="mtl"))


@pytest.mark.parametrize("method", ["mtl", "hydra", "rlora"])
def test_mixed_task_batch_equals_task_by_task(method):
    model = perturb(rlora.inject(tiny_llama(), rlora.AdapterConfig(method=method, tasks=TASKS, dropout=0)))
    ids = torch.randint(0, 128, (4, 6))
    tids = torch.tensor([2, 0, 1, 0])
    with rlora.task_ids(tids):
        mixed = model(ids).logits
    for n in range(4):
        with rlora.task_ids([int(tids[n])]):
            one = model(ids[n:n + 1]).logits
        assert (mixed[n] - one[0]).abs().max().item() <= 1e-5


def test_task_ids_kwarg_equals_context_manager():
    model = perturb(rlora.inject(tiny_llama(), rlora.AdapterConfig(method="mtl", tasks=TASKS)))
    ids = torch.randint(0, 128, (2, 5))
    with rlora.task_ids([1, 2]):
        a = model(ids).logits
    b = model(ids, task_ids=torch.tensor([1, 2])).logits
    assert torch.equal(a, b)
    with pytest.raises(AdapterError, match="needs per-sample task ids"):
        model(ids)  # the kwarg did not leak into later calls


def test_router_methods_ignore_task_ids():
    model = perturb(rlora.inject(tiny_llama(), rlora.AdapterConfig(method="rlora", tasks=TASKS)))
    ids = torch.randint(0, 128, (2, 5))
    with rlora.task_ids([0, 1]):
        a = model(ids).logits
    assert torch.equal(a, model(ids).logits)


@pytest.mark.parametrize("method,task", [("lora", None), ("lora", "math"), ("mtl", "math"), ("mtl", 0)])
def test_merge_equals_adapter_and_unmerge_restores_w0(method, task):
    model = perturb(rlora.inject(tiny_llama(), rlora.AdapterConfig(method=method, tasks=TASKS)))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(0, 128, (2, 7))
    t = 0 if task is None else (TASKS.index(task) if isinstance(task, str) else task)
    with rlora.task_ids([t, t]):
        ref = model(ids).logits
    rlora.merge(model, task=task)
    assert any(not torch.equal(p, w0[n]) for n, p in model.named_parameters() if n in w0)
    merged = model(ids).logits  # no task ids needed: the adapter is folded in
    assert (merged - ref).abs().max().item() <= 1e-5
    rlora.unmerge(model)
    for n, p in model.named_parameters():
        if n in w0:
            assert torch.equal(p, w0[n]), n
    with rlora.task_ids([t, t]):
        assert torch.equal(model(ids).logits, ref)


def test_merged_forward_does_not_recompute_adapter():
    model = perturb(rlora.inject(tiny_llama(), rlora.AdapterConfig(method="lora")))
    rlora.merge(model)
    calls = []
    for _, layer in rlora.adapter_layers(model):
        layer.rank_features = lambda x, _c=calls: _c.append(1)
    model(torch.randint(0, 128, (1, 4)))
    assert calls == []


@pytest.mark.parametrize("method", ["hydra", "rlora"])
def test_router_methods_refuse_exact_merge(method):
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method=method))
    w = model.model.layers[0].self_attn.q_proj.base.weight.detach().clone()
    with pytest.raises(AdapterError, match="cannot be merged exactly"):
        rlora.merge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base.weight, w)


def test_merge_errors():
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method="mtl", tasks=TASKS))
    with pytest.raises(AdapterError, match="needs a task"):
        rlora.merge(model)
    with pytest.raises(AdapterError, match="unknown task 'poetry'"):
        rlora.merge(model, task="poetry")


def test_equal_budget_setting_has_equal_trainable_counts():
    """Documented equal-budget setting (README): for square 64-d projections, lora r=12 ==
    hydra/rlora N=2 r=8 (+ routers) == mtl n=2 r=8 diagonal (3 tasks): the shared A·B budget
    r·d_in + N·r·d_out is exactly equal (12·(64 + 64) = 8·64 + 2·8·64 = 1536 per module, 4 modules);
    the router/task terms come on top, are reported, and stay under 10 % of the total."""
    counts = {}
    for method, r, n in [("lora", 12, 1), ("hydra", 8, 2), ("rlora", 8, 2), ("mtl", 8, 2)]:
        cfg = rlora.AdapterConfig(method=method, r=r, num_heads=n, tasks=TASKS, diagonal=True,
                                  target_modules=["q_proj", "o_proj"])
        model = rlora.inject(tiny_llama(), cfg)
        ab = sum(l.lora_A.numel() + l.lora_B.numel() for _, l in rlora.adapter_layers(model))
        counts[method] = (ab, rlora.count_parameters(model)[0])
    print("trainable (A+B, total):", counts)
    assert {ab for ab, _ in counts.values()} == {4 * 1536}
    for method, (ab, total) in counts.items():
        assert (total - ab) / total < 0.1


@pytest.mark.parametrize("method", METHODS)
def test_method_picks_the_layer(method):
    from rlora.layers import LAYERS

    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method=method, tasks=TASKS))
    layers = [layer for _, layer in rlora.adapter_layers(model)]
    assert layers and all(type(layer) is LAYERS[method] and layer.method == method for layer in layers)
    params = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    expected = {"lora": {"lora_A", "lora_B"}, "hydra": {"lora_A", "lora_B", "router"},
                "rlora": {"lora_A", "lora_B", "router"}, "mtl": {"lora_A", "lora_B", "task_lambda", "task_weight"},
                "align": {"lora_A", "lora_B"}}
    assert params == expected[method]
