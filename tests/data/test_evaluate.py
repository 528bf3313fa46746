"""Option scoring and evaluation: packed == plain == a naive full-logits reference, batching-invariant."""
import random

import pytest
import torch

from rlora.context import current_task_ids
from rlora.data import Example, build_prompt, evaluate_multiple_choice, evaluate_tasks, merge_metrics, shard
from rlora.data.evaluate import normalize_answer
from rlora.data.tokenization import answer_token_ids, prompt_token_ids


def _examples(n, seed=0, free_every=0):
    rnd = random.Random(seed)
    words = "red green blue river stone quick slow bright seven apple".split()
    out = []
    for i in range(n):
        k = rnd.randint(2, 5)
        opts = [" ".join(rnd.choices(words, k=rnd.randint(1, 4))) + f" {j}" for j in range(k)]
        text = " ".join(rnd.choices(words, k=rnd.randint(3, 30)))
        if free_every and i % free_every == 0:
            out.append(Example("syn", f"syn-{i}", text, None, opts[0]))
        else:
            out.append(Example("syn", f"syn-{i}", text, opts, opts[rnd.randrange(k)]))
    return out


def _reference_scores(model, tok, ex, max_length=256):
    """Sum of log-probs of each option + eos, from the model's own full logits on prompt ++ option."""
    prompt = prompt_token_ids(tok, [build_prompt(ex, tok)], True)[0]
    scores = []
    for o in (ex.options or [ex.target]):
        ans = answer_token_ids(tok, o, True)
        ids = torch.tensor([prompt + ans])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ans)))
    return scores


def test_scores_match_naive_reference(tiny_model, smol_tokenizer):
    exs = _examples(6, seed=1)
    res = evaluate_multiple_choice(tiny_model, smol_tokenizer, exs, batch_size=4, return_details=True)
    for ex, got in zip(exs, res["scores"]):
        assert got == pytest.approx(_reference_scores(tiny_model, smol_tokenizer, ex), abs=1e-4)
    assert res["n"] == 6 and 0 <= res["accuracy"] <= 1


def test_packed_plain_and_batch_sizes_agree(tiny_model, smol_tokenizer):
    exs = _examples(9, seed=2)
    runs = [evaluate_multiple_choice(tiny_model, smol_tokenizer, exs, batch_size=bs, packed=p, return_details=True)
            for p, bs in [(True, 1), (True, 4), (False, 1), (False, 7)]]
    base = runs[0]
    for r in runs[1:]:
        for a, b in zip(base["scores"], r["scores"]):
            assert a == pytest.approx(b, abs=1e-4)
        assert r["predictions"] == base["predictions"] and r["loss"] == pytest.approx(base["loss"], abs=1e-5)


def test_accuracy_loss_and_length_normalisation(tiny_model, smol_tokenizer):
    exs = _examples(8, seed=3)
    res = evaluate_multiple_choice(tiny_model, smol_tokenizer, exs, return_details=True)
    norm = evaluate_multiple_choice(tiny_model, smol_tokenizer, exs, length_normalized=True, return_details=True)
    correct, nll, tokens = 0, 0.0, 0
    for ex, s, sn in zip(exs, res["scores"], norm["scores"]):
        lens = [len(answer_token_ids(smol_tokenizer, o, True)) for o in ex.options]
        assert sn == pytest.approx([a / n for a, n in zip(s, lens)], abs=1e-6)
        correct += ex.options[max(range(len(s)), key=s.__getitem__)] == ex.target
        nll -= s[ex.label]
        tokens += lens[ex.label]
    assert res["correct"] == correct and res["accuracy"] == correct / 8
    assert res["loss"] == pytest.approx(nll / tokens, rel=1e-6) and res["tokens"] == tokens


def test_free_form_generation_batched_equals_single(tiny_model, smol_tokenizer):
    exs = _examples(5, seed=4, free_every=1)
    batched = evaluate_multiple_choice(tiny_model, smol_tokenizer, exs, batch_size=5, max_new_tokens=6,
                                       return_details=True)
    single = [evaluate_multiple_choice(tiny_model, smol_tokenizer, [e], batch_size=1, max_new_tokens=6,
                                       return_details=True)["predictions"][0] for e in exs]
    assert batched["predictions"] == single                     # left padding does not change greedy output
    hit = Example("syn", "hit", exs[0].input, None, "  " + single[0].upper() + " ")
    if normalize_answer(single[0]):
        assert evaluate_multiple_choice(tiny_model, smol_tokenizer, [hit], max_new_tokens=6)["accuracy"] == 1.0
    assert normalize_answer(" The  Steak. ") == "the steak"


def test_task_ids_reach_the_model_and_mode_is_restored(tiny_model, smol_tokenizer):
    seen = []
    hook = tiny_model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(current_task_ids()))
    tiny_model.train()
    try:
        evaluate_multiple_choice(tiny_model, smol_tokenizer, _examples(5, seed=5), batch_size=2, task_id=3)
        assert tiny_model.training
    finally:
        hook.remove()
        tiny_model.eval()
    assert seen and all(t is not None and t.tolist() == [3] * len(t) for t in seen)
    assert sorted(len(t) for t in seen) == [1, 2, 2]


def test_shards_merge_to_the_full_result(tiny_model, smol_tokenizer):
    exs = _examples(7, seed=6)
    parts = [shard(exs, r, 3) for r in range(3)]
    assert sorted(e.id for p in parts for e in p) == sorted(e.id for e in exs)
    full = evaluate_multiple_choice(tiny_model, smol_tokenizer, exs)
    merged = merge_metrics([evaluate_multiple_choice(tiny_model, smol_tokenizer, p) for p in parts])
    assert merged["n"] == 7 and merged["correct"] == full["correct"]
    assert merged["loss"] == pytest.approx(full["loss"], abs=1e-5)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard(exs, 3, 3)


def test_evaluate_tasks_routes_each_task(tiny_model, smol_tokenizer):
    seen = []
    hook = tiny_model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(current_task_ids()))
    try:
        res = evaluate_tasks(tiny_model, smol_tokenizer, {"b": _examples(3, 7), "a": _examples(2, 8),
                                                          "other": _examples(1, 9)},
                             task_names=["a", "b"], max_examples_per_task=2, progress=False)
    finally:
        hook.remove()
    assert list(res) == ["b", "a", "other"] and [r["n"] for r in res.values()] == [2, 2, 1]
    assert [None if t is None else t[0].item() for t in seen] == [1, 0, None]


def test_prefix_tree_shares_common_prefixes(tiny_model, smol_tokenizer):
    from rlora.data.evaluate import build_trie

    trie = build_trie([[5, 6, 2], [5, 7, 2], [5, 6, 2], [9, 2]])
    assert trie.tokens == [5, 6, 2, 7, 2, 9, 2] and trie.parent == [-1, 0, 1, 0, 3, -1, 5]
    assert trie.depth == [0, 1, 2, 1, 2, 0, 1] and trie.paths[0] == trie.paths[2] == [0, 1, 2]
    opts = ["card arrival", "card linking", "card arrival", "cash withdrawal", "card"]
    ex = Example("syn", "s-1", "I lost my card yesterday", opts, "card linking")
    res = evaluate_multiple_choice(tiny_model, smol_tokenizer, [ex], return_details=True)
    assert res["scores"][0] == pytest.approx(_reference_scores(tiny_model, smol_tokenizer, ex), abs=1e-4)
    assert res["scores"][0][0] == res["scores"][0][2]
