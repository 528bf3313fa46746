"""Option scoring and evaluation: packed == plain == a naive full-logits reference, batching-invariant."""
import itertools
import random
from pathlib import Path

import pytest
import torch

from rlora.context import current_task_ids
from rlora.data import Example, build_prompt, evaluate_multiple_choice, evaluate_tasks, merge_metrics, shard
from rlora.data.evaluate import normalize_answer
from rlora.data.scoring import score_options
from rlora.data.tokenization import answer_token_ids, prompt_token_ids

from .packed_reference import packed_scores


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
    hook = tiny_model.model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append((current_task_ids(), (a[0] if a else kw["hidden_states"]).shape[0])),
        with_kwargs=True)
    tiny_model.train()
    try:
        evaluate_multiple_choice(tiny_model, smol_tokenizer, _examples(5, seed=5), batch_size=2, task_id=3)
        assert tiny_model.training
    finally:
        hook.remove()
        tiny_model.eval()
    # the shared prefix once, then a prompt forward and a tree forward per batch of <= 2 rows
    assert len(seen) == 1 + 2 * 3
    assert all(t is not None and t.tolist() == [3] * n for t, n in seen)        # one id per sequence
    assert [n for _, n in seen[1::2]] == [2, 2, 1]


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
    # "a" and "b" share forwards (the prefix once per task, then one prompt and one tree forward for their 4
    # rows), each sequence with its own task's id; "other" (not in task_names) runs alone, unrouted
    ids = [None if t is None else sorted(t.tolist()) for t in seen]
    assert ids[:2] == [[0, 1], [0, 0, 1, 1]] and sorted(set(ids[2])) == [0, 1] and len(ids) == 3 + 3
    assert ids[3:] == [None] * 3


def _randomised_mtl(tok, tasks):
    return _randomised(tok, "mtl", tasks, seed=5)


def _randomised(tok, method, tasks, seed):
    """A tiny Llama with ``method`` adapters whose every adapter parameter is moved off its init."""
    import rlora
    from helpers import tiny_llama

    model = rlora.inject(tiny_llama(vocab=len(tok), hidden=32),
                         rlora.AdapterConfig(method=method, r=4, num_heads=3, alpha=8, tasks=list(tasks),
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rlora.adapter_layers(model):
            for name, p in layer.named_parameters():
                if not name.startswith("base"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.mark.parametrize("packed", [True, False])
def test_tasks_scored_together_equal_one_task_at_a_time(smol_tokenizer, packed, monkeypatch):
    """Rows of 12 tasks share batches, each routed to its task: the same per-row correctness and option scores
    as one task at a time (up to float rounding), in 4x fewer forwards with the tree layout here (2 rows per task,
    batches of 8)."""
    from rlora.data import scoring

    names = [f"t{i}" for i in range(12)]
    model = _randomised_mtl(smol_tokenizer, names)
    tasks = {n: _examples(2, seed=40 + i) for i, n in enumerate(names)}
    real = scoring.score_options
    monkeypatch.setattr("rlora.data.evaluate.score_options",
                        lambda *a, **k: real(*a[:6], packed, *a[7:], **k) if len(a) > 6 else real(*a, **k))
    forwards = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    together = evaluate_tasks(model, smol_tokenizer, tasks, names, batch_size=8, progress=False)
    assert max(forwards) <= 8  # the 12 tasks' shared prefix too: two forwards, not one of 12 rows
    n_together = len(forwards)
    alone = {n: evaluate_multiple_choice(model, smol_tokenizer, tasks[n], batch_size=8, task_id=i,
                                         packed=packed, return_details=True) for i, n in enumerate(names)}
    hook.remove()
    n_alone = len(forwards) - n_together
    for n in names:
        assert together[n]["row_correct"] == alone[n]["row_correct"] and together[n]["n"] == 2
        assert together[n]["nll_sum"] == pytest.approx(alone[n]["nll_sum"], abs=1e-4)
        assert together[n]["row_index"] == [0, 1]
    # tree layout: 3 forwards per task alone; plain layout: its (row, option) batches fill up either way
    assert n_alone >= (4 if packed else 1) * n_together, (n_alone, n_together)
    wrong = evaluate_multiple_choice(model, smol_tokenizer, tasks["t0"], batch_size=8, task_id=5, packed=packed)
    assert wrong["nll_sum"] != pytest.approx(alone["t0"]["nll_sum"], abs=1e-3)  # routing matters here


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


# ------------------------------------------------------------------------------------------------
# the tree layout against the previous packed scorer
# ------------------------------------------------------------------------------------------------
def _rows(tok, exs, max_length=256):
    from rlora.data.evaluate import _prepare_rows

    return _prepare_rows(tok, exs, max_length, True, None)


def _labels_examples(n, seed):
    """Rows that share one label set with common first tokens (like banking77), varied prompts."""
    rnd = random.Random(seed)
    labels = ["card arrival", "card linking", "card not working", "card payment fee charged", "cash withdrawal",
              "cash withdrawal charge", "top up failed", "top up reverted", "transfer timing", "exchange rate"]
    words = "my card did not arrive and the cash machine kept it please help".split()
    return [Example("lab", f"lab-{i}", " ".join(rnd.choices(words, k=rnd.randint(2, 25))), labels,
                    labels[rnd.randrange(len(labels))]) for i in range(n)]


def _assert_same_scores(new, old, tol=1e-4):
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert [n for _, n in a] == [n for _, n in b]
        assert [s for s, _ in a] == pytest.approx([s for s, _ in b], abs=tol)
        assert max(range(len(a)), key=lambda k: a[k][0]) == max(range(len(b)), key=lambda k: b[k][0])


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_tree_layout_equals_the_previous_packed_scorer(tiny_model, smol_tokenizer, batch_size):

    rows = _rows(smol_tokenizer, _labels_examples(7, seed=11) + _examples(5, seed=12))
    old = packed_scores(tiny_model, rows, smol_tokenizer.pad_token_id, batch_size=4)
    with torch.no_grad():
        new = score_options(tiny_model, rows, smol_tokenizer.pad_token_id, batch_size, 256, packed=True)
    _assert_same_scores(new, old)


def test_tree_layout_with_eager_attention(smol_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      attn_implementation="eager")
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    rows = _rows(smol_tokenizer, _labels_examples(4, seed=19) + _examples(3, seed=20))
    old = packed_scores(model, rows, smol_tokenizer.pad_token_id)
    with torch.no_grad():
        new = score_options(model, rows, smol_tokenizer.pad_token_id, 4, 256, packed=True)
    _assert_same_scores(new, old)


def test_shared_prefix_leaves_every_prompt_a_token():
    from rlora.data.scoring import Row, shared_prefix_length

    rows = [Row([1, 2, 3, 4], [[9, 0]]), Row([1, 2, 3, 5, 6], [[9, 0]]), Row([1, 2, 3, 4], [[8, 0]])]
    assert shared_prefix_length(rows) == 3
    assert shared_prefix_length(rows[:1]) == 3 and shared_prefix_length([rows[0], rows[2]]) == 3
    assert shared_prefix_length([rows[0], Row([7, 2], [[9, 0]])]) == 0 and shared_prefix_length([]) == 0


def test_tree_layout_with_left_truncated_prompts_and_one_row(tiny_model, smol_tokenizer):
    from rlora.data.scoring import shared_prefix_length

    rows = _rows(smol_tokenizer, _labels_examples(4, seed=13), max_length=24)       # prompts cut from the left
    assert all(len(r.prompt) + max(len(o) for o in r.options) <= 24 for r in rows)
    assert shared_prefix_length(rows) < min(len(r.prompt) for r in rows)
    for group in (rows, rows[:1]):
        old = packed_scores(tiny_model, group, smol_tokenizer.pad_token_id)
        with torch.no_grad():
            new = score_options(tiny_model, group, smol_tokenizer.pad_token_id, 2, 24, packed=True)
        _assert_same_scores(new, old)


@pytest.mark.parametrize("method", ["lora", "hydra", "rlora", "mtl"])
def test_tree_layout_equals_previous_scorer_with_adapters(smol_tokenizer, method):
    """Per-token routers and per-sample task ids (MTL-LoRA) see the same inputs in both layouts."""
    model = _randomised(smol_tokenizer, method, ["a", "b", "c"], seed=3)
    rows = _rows(smol_tokenizer, _labels_examples(5, seed=14))
    per_task = []
    for task_id in (0, 2):
        old = packed_scores(model, rows, smol_tokenizer.pad_token_id, batch_size=2, task_id=task_id)
        with torch.no_grad():
            new = score_options(model, rows, smol_tokenizer.pad_token_id, 3, 256, task_id=task_id, packed=True)
        _assert_same_scores(new, old)
        per_task.append(new)
    if method == "mtl":                                  # the task id changes the scores: routing is live
        assert per_task[0][0][0][0] != pytest.approx(per_task[1][0][0][0], abs=1e-3)


def test_output_layer_runs_once_per_distinct_state(tiny_model, smol_tokenizer):

    rows = _rows(smol_tokenizer, _labels_examples(3, seed=15))
    seen = []
    hook = tiny_model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            score_options(tiny_model, rows, smol_tokenizer.pad_token_id, 16, 256, packed=True)
    finally:
        hook.remove()
    # one state per row (its last prompt token) and one per internal trie node; leaves are never fed
    assert sum(seen) == sum(1 + len(r.trie.internal) for r in rows)
    assert sum(seen) < sum(len(r.trie.tokens) for r in rows)


def test_pack_subtrees_keeps_each_subtree_in_one_bin():
    from rlora.data.option_trie import build_trie, pack_subtrees

    rnd = random.Random(0)
    options = [[rnd.randrange(6) for _ in range(rnd.randint(1, 5))] + [99] for _ in range(40)]
    trie = build_trie(options)
    assert trie.internal == sorted({p for p in trie.parent if p >= 0})
    for width in (1, 4, 16, 1000):
        bins = pack_subtrees(trie, width)
        flat = [n for b in bins for n in b]
        assert sorted(flat) == trie.internal                                  # every internal node once
        bin_of = {n: k for k, b in enumerate(bins) for n in b}
        assert all(bin_of[trie.root(n)] == bin_of[n] for n in flat)          # subtrees whole
        assert all(b == sorted(b) for b in bins)                              # parents before children
        largest = max(sum(1 for n in trie.internal if trie.root(n) == r) for r in set(map(trie.root, flat)))
        assert max(len(b) for b in bins) <= max(2 * max(width, largest) - 1, largest)
    assert pack_subtrees(build_trie([[7], [8]]), 4) == []                     # one-token options: no tree forward
    with pytest.raises(ValueError, match="width >= 1"):
        pack_subtrees(trie, 0)


# ------------------------------------------------------------------------------------------------
# per-row results
# ------------------------------------------------------------------------------------------------
def test_per_row_results_and_sharded_merge_keep_row_order(tiny_model, smol_tokenizer):
    tasks = {"a": _examples(7, seed=16), "b": _labels_examples(5, seed=17)}
    full = evaluate_tasks(tiny_model, smol_tokenizer, tasks, ["a", "b"], progress=False)
    for name, exs in tasks.items():
        r = full[name]
        assert r["row_ids"] == [e.id for e in exs] and r["row_index"] == list(range(len(exs)))
        assert set(r["row_correct"]) <= {0, 1} and sum(r["row_correct"]) == r["correct"]
        assert {"accuracy", "n", "loss", "correct", "nll_sum", "tokens"} <= set(r)
    parts = [evaluate_tasks(tiny_model, smol_tokenizer, tasks, ["a", "b"], rank=k, world_size=3, progress=False)
             for k in range(3)]
    assert parts[1]["a"]["row_index"] == [1, 4]
    for name in tasks:
        merged = merge_metrics([p[name] for p in reversed(parts)])             # any part order
        for key in ("row_ids", "row_correct", "row_index", "correct", "n"):
            assert merged[key] == full[name][key]
        assert merged["loss"] == pytest.approx(full[name]["loss"], abs=1e-5)
    with pytest.raises(ValueError, match=r"row_index \[0, 3, 6\] appears in more than one part"):
        merge_metrics([parts[0]["a"], parts[0]["a"]])


def test_merge_without_row_index_concatenates_in_part_order(tiny_model, smol_tokenizer):
    exs = _examples(5, seed=18)
    one = evaluate_multiple_choice(tiny_model, smol_tokenizer, exs[:2])
    two = evaluate_multiple_choice(tiny_model, smol_tokenizer, exs[2:])
    merged = merge_metrics([one, two])
    assert merged["row_ids"] == [e.id for e in exs]
    assert merged["row_correct"] == one["row_correct"] + two["row_correct"] and "row_index" not in merged
    empty = evaluate_multiple_choice(tiny_model, smol_tokenizer, [])
    assert empty["row_ids"] == [] and empty["row_correct"] == [] and empty["n"] == 0


# ------------------------------------------------------------------------------------------------
# the real SmolLM2-135M on real rows (mtl_cpu6), with and without adapters
# ------------------------------------------------------------------------------------------------
MTL_CPU6 = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mtl_cpu6").resolve()
needs_cpu6 = pytest.mark.skipif(not MTL_CPU6.is_dir(), reason=f"{MTL_CPU6} is absent (shared data not mounted)")


@pytest.fixture(scope="module")
def cpu6_rows():
    from rlora.config import DataConfig
    from rlora.data import load_tasks

    dev = load_tasks(DataConfig(path=str(MTL_CPU6), tasks=[{"name": "banking77"}, {"name": "openbookqa"}]), "dev")
    return dev["banking77"], dev["openbookqa"]


@needs_cpu6
def test_real_model_tree_layout_equals_previous_scorer(smol_model, smol_tokenizer, cpu6_rows):
    banking, obqa = cpu6_rows
    rows = _rows(smol_tokenizer, banking[:1] + obqa[:3])
    assert len(rows[0].options) == 77
    old = packed_scores(smol_model, rows, smol_tokenizer.pad_token_id, batch_size=2)
    with torch.no_grad():
        new = score_options(smol_model, rows, smol_tokenizer.pad_token_id, 16, 256)
    _assert_same_scores(new, old)


@needs_cpu6
@pytest.mark.parametrize("method", ["lora", "hydra", "rlora", "mtl"])
def test_real_model_with_adapters_equals_previous_scorer(smol_tokenizer, cpu6_rows, method):
    import rlora
    from rlora.models import load_base_model

    model = rlora.inject(load_base_model("smollm2-135m"),
                         rlora.AdapterConfig(method=method, r=4, num_heads=3, tasks=["banking77", "openbookqa"],
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in rlora.adapter_layers(model):
            for name, p in layer.named_parameters():
                if not name.startswith("base"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    banking, obqa = cpu6_rows
    rows = _rows(smol_tokenizer, banking[:1] + obqa[:2])
    old = packed_scores(model, rows, smol_tokenizer.pad_token_id, batch_size=3, task_id=1)
    with torch.no_grad():
        new = score_options(model, rows, smol_tokenizer.pad_token_id, 16, 256, task_id=1)
    _assert_same_scores(new, old)
