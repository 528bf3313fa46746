"""`generate` with task ids: per prompt, expanded for beams and returned sequences, the same with and without
the KV cache."""
import pytest
import torch

import rlora
from hf_helpers import METHODS, adapter_model

IDS = torch.tensor([2, 0, 1])
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def _prompts():
    return torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(9))


def _one_by_one(model, prompts, ids, **kw):
    return torch.cat([model.generate(prompts[i:i + 1], task_ids=ids[i:i + 1], **GEN, **kw) for i in range(len(ids))])


@pytest.mark.parametrize("method", METHODS)
def test_generate_task_ids_keyword_per_prompt_and_cache(method):
    model = adapter_model(method).eval()
    prompts = _prompts()
    out = model.generate(prompts, task_ids=IDS, **GEN)
    no_cache = model.generate(prompts, task_ids=IDS, use_cache=False, **GEN)
    assert out.shape == (3, 9)
    assert torch.equal(out, no_cache)
    assert torch.equal(out, _one_by_one(model, prompts, IDS))


def test_generate_kv_cache_scores_equal_no_cache_scores():
    model = adapter_model("mtl").eval()
    kw = dict(task_ids=IDS, output_scores=True, return_dict_in_generate=True, **GEN)
    a = model.generate(_prompts(), **kw)
    b = model.generate(_prompts(), use_cache=False, **kw)
    worst = max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("method", METHODS)
def test_generate_expands_context_ids_for_beams_and_returned_sequences(method):
    """`with rlora.task_ids(t): m.generate(ids, num_beams=2, num_return_sequences=2)`: rows 2i, 2i+1 are
    prompt i's, decoded with t[i]."""
    model = adapter_model(method).eval()
    prompts = _prompts()
    with rlora.task_ids(IDS):
        out = model.generate(prompts, num_beams=2, num_return_sequences=2, **GEN)
    assert out.shape == (6, 9)
    assert torch.equal(out, _one_by_one(model, prompts, IDS, num_beams=2, num_return_sequences=2))


def test_generate_keyword_beats_outer_context_and_ids_matter():
    model = adapter_model("mtl").eval()
    prompts = _prompts()
    with rlora.task_ids(0):
        inner = model.generate(prompts, task_ids=IDS, **GEN)
    assert torch.equal(inner, model.generate(prompts, task_ids=IDS, **GEN))
    # the ids change what is generated here (else the comparisons above would prove nothing)
    assert not torch.equal(inner, model.generate(prompts, task_ids=torch.tensor([0, 1, 2]), **GEN))


def test_generate_without_ids_names_the_fix():
    with pytest.raises(rlora.AdapterError, match="task_ids"):
        adapter_model("mtl").generate(_prompts(), **GEN)
