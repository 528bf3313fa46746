"""The PEFT-style methods of AdapterModel: print_trainable_parameters, merge_and_unload, disable_adapter, and
how task ids reach the layers (inner keyword wins; a missing one names the fix)."""
import pytest
import torch

import rlora
from hf_helpers import METHODS, MIXED, TASKS, adapter_model
from helpers import tiny_llama


def _logits(model, tokens, **kw):
    with torch.no_grad():
        return model(tokens, **kw).logits


@pytest.mark.parametrize("method", METHODS)
def test_print_trainable_parameters(method, capsys):
    model = adapter_model(method)
    trainable = sum(p.numel() for _, l in rlora.adapter_layers(model) for p in l.parameters() if p.requires_grad)
    total = sum(p.numel() for p in tiny_llama().parameters()) + trainable
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
    assert model.get_nb_trainable_parameters() == (trainable, total)


@pytest.mark.parametrize("method,task", [("lora", None), ("mtl", "math"), ("mtl", 2)])
def test_merge_and_unload_is_exact(method, task, tokens):
    model = adapter_model(method).eval()
    t = TASKS.index(task) if isinstance(task, str) else (task or 0)
    ref = _logits(model, tokens, task_ids=t)
    plain = model.merge_and_unload(task=task)
    assert type(plain).__name__ == "LlamaForCausalLM" and not list(rlora.adapter_layers(plain))
    assert not hasattr(plain, "rlora_config")
    assert (_logits(plain, tokens) - ref).abs().max().item() <= 1e-5
    # and it really is the adapter that was folded in, not the base model
    assert (_logits(tiny_llama(), tokens) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", ["hydra", "rlora"])
def test_merge_and_unload_of_routers_reports_why_and_changes_nothing(method, tokens):
    model = adapter_model(method).eval()
    ref = _logits(model, tokens)
    with pytest.raises(rlora.AdapterError, match="cannot be merged exactly.*rlora export"):
        model.merge_and_unload()
    assert len(list(rlora.adapter_layers(model))) == 14
    assert torch.equal(_logits(model, tokens), ref)


@pytest.mark.parametrize("method", METHODS)
def test_disable_adapter_gives_the_base_model(method, tokens):
    model = adapter_model(method).eval()
    with_adapter = _logits(model, tokens, task_ids=MIXED)
    with model.disable_adapter():
        off = _logits(model, tokens)  # MTL-LoRA needs no task ids while disabled
    assert torch.equal(off, _logits(tiny_llama(), tokens))
    assert (off - with_adapter).abs().max().item() > 1e-3
    assert torch.equal(_logits(model, tokens, task_ids=MIXED), with_adapter)


def test_inner_keyword_beats_outer_context(tokens):
    model = adapter_model("mtl").eval()
    with rlora.task_ids(0):
        inner = _logits(model, tokens, task_ids=MIXED)
        outer = _logits(model, tokens)
    assert torch.equal(inner, _logits(model, tokens, task_ids=MIXED))
    assert torch.equal(outer, _logits(model, tokens, task_ids=0))
    assert not torch.equal(inner, outer)


def test_mtl_without_ids_names_the_fix(tokens):
    with pytest.raises(rlora.AdapterError, match=r"needs per-sample task ids.*`task_ids` value.*data collator"):
        adapter_model("mtl")(tokens)
    with pytest.raises(rlora.AdapterError, match="task id 3 is out of range"):
        adapter_model("mtl")(tokens, task_ids=torch.tensor([0, 1, 2, 3]))  # the eager range check holds


def test_align_warns_once_that_a_training_forward_has_no_alignment_term(tokens):
    import warnings

    from rlora.hf.model import ALIGN_WARNING
    model = adapter_model("align")
    labels = tokens.clone()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.eval()
        model(tokens, labels=labels)                       # evaluation: no warning
        model.train()
        model(tokens, labels=labels)
        model(tokens, labels=labels)                       # once per model
    assert [str(w.message) for w in seen if w.category is UserWarning] == [ALIGN_WARNING]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        adapter_model("lora").train()(tokens, labels=labels)
    assert not [w for w in seen if "align" in str(w.message)]
