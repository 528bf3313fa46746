"""Evaluation: log-likelihood scoring of answer options, exact match for free-form answers.

Option scoring. For a row with prompt tokens ``p`` and options ``o_1 .. o_K`` (each = answer tokens +
eos, as in training), the score of option k is

    s_k = sum_j log P(o_k[j] | p, o_k[:j])          (divided by len(o_k) when length_normalized)

and the prediction is ``argmax_k s_k``. ``loss`` is the per-token negative log-likelihood of the
target option, ``sum(-s_gold) / sum(len(o_gold))`` -- the training loss measured on this split.
How the forwards are laid out (the prompt once, the options as a prefix tree on top of its cached
keys/values, the output layer once per distinct state) is in :mod:`rlora.data.scoring`.

Free-form rows (``options`` is None) are scored by greedy generation: accuracy is the exact match of
the normalised text (lowercase, collapsed whitespace, outer punctuation stripped) with the target;
``loss`` is the NLL of the target as above.

Per-row results. Besides the totals, every result carries ``row_ids`` (the rows' ``id``) and
``row_correct`` (1 if the row was answered correctly, else 0) in row order; :func:`evaluate_tasks`
adds ``row_index`` (each row's position in its task) so that :func:`merge_metrics` can put the rows
of rank shards back in the original order.

With ``task_id`` the forward runs inside ``rlora.task_ids(...)`` so multi-head adapters route every
row to that task (a model without adapters ignores it).
"""
from __future__ import annotations

import string
from typing import Callable, Mapping, Optional, Sequence, TypeVar

import torch

from .example import Example
from .option_trie import build_trie
from .prompts import build_prompt
from .scoring import Row, model_device_dtype, score_options, supports_packing, task_context
from .tokenization import answer_token_ids, prompt_token_ids

T = TypeVar("T")
ROW_KEYS = ("row_ids", "row_correct")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def shard(examples: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rows ``rank, rank + world_size, ...``: disjoint shards that together cover every row once."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(examples[rank::world_size])


def merge_metrics(parts: Sequence[Mapping]) -> dict:
    """Combine the metrics of disjoint shards (sums of ``correct``, ``n``, ``nll_sum``, ``tokens``).

    Per-row lists (``row_ids``, ``row_correct``) are joined when every part has them: ordered by
    ``row_index`` when every part has that (as :func:`evaluate_tasks` sets it), else in part order."""
    correct = sum(p["correct"] for p in parts)
    n = sum(p["n"] for p in parts)
    nll = sum(p["nll_sum"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    result = _metrics(correct, n, nll, tokens)
    if parts and all(all(k in p for k in ROW_KEYS) for p in parts):
        rows = [tuple(p[k][j] for k in ROW_KEYS) for p in parts for j in range(len(p["row_ids"]))]
        if all("row_index" in p for p in parts):
            index = [i for p in parts for i in p["row_index"]]
            if len(set(index)) != len(index):
                dup = sorted({i for i in index if index.count(i) > 1})[:5]
                raise ValueError(f"merge_metrics: row_index {dup} appears in more than one part: merge disjoint "
                                 "shards (one per rank)")
            order = sorted(range(len(index)), key=index.__getitem__)
            rows = [rows[j] for j in order]
            result["row_index"] = [index[j] for j in order]
        for k, key in enumerate(ROW_KEYS):
            result[key] = [r[k] for r in rows]
    return result


def _metrics(correct: float, n: int, nll: float, tokens: int) -> dict:
    return {"accuracy": correct / n if n else float("nan"), "n": int(n),
            "loss": nll / tokens if tokens else float("nan"),
            "correct": float(correct), "nll_sum": float(nll), "tokens": int(tokens)}


def normalize_answer(text: str) -> str:
    return " ".join(text.split()).lower().strip(string.punctuation + " ")


# ----------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------
def _prepare_rows(tokenizer, examples: Sequence[Example], max_length: int, use_chat_template: bool,
                  template: Optional[str]) -> list[Row]:
    """Token ids per row; the prompt is left-truncated so that prompt + longest option <= max_length."""
    prompts = [build_prompt(ex, tokenizer, use_chat_template, template) for ex in examples]
    prompt_ids = prompt_token_ids(tokenizer, prompts, use_chat_template) if prompts else []
    cache: dict[str, list[int]] = {}
    rows = []
    for ex, p in zip(examples, prompt_ids):
        opts = ex.options if ex.options is not None else [ex.target]
        for o in opts:
            if o not in cache:
                cache[o] = answer_token_ids(tokenizer, o, use_chat_template)
        ids = [cache[o] for o in opts]
        keep = max(1, max_length - max(len(o) for o in ids))
        p = p[len(p) - keep:] if len(p) > keep else p
        room = max_length - len(p)
        rows.append(Row(p, [o[:room] for o in ids]))
    return rows


# ----------------------------------------------------------------------------------------------
# generation (free-form answers)
# ----------------------------------------------------------------------------------------------
def _generate(model, tokenizer, prompts: Sequence[list[int]], batch_size: int, max_new_tokens: int,
              task_id: Optional[int]) -> list[str]:
    device, _ = model_device_dtype(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, p in enumerate(batch):                     # left padding: every row ends where generation starts
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, width - len(p):] = 1
        with task_context(task_id, len(batch), device):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return texts


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------
def evaluate_multiple_choice(model, tokenizer, examples: Sequence[Example], batch_size: int = 16,
                             length_normalized: bool = False, max_length: int = 256,
                             task_id: Optional[int] = None, use_chat_template: bool = True,
                             template: Optional[str] = None, packed: Optional[bool] = None,
                             max_new_tokens: int = 32, return_details: bool = False,
                             on_rows: Optional[Callable[[int], None]] = None) -> dict:
    """Accuracy and loss of ``model`` on ``examples`` (one task).

    Returns ``{"accuracy", "n", "loss", "correct", "nll_sum", "tokens", "row_ids", "row_correct"}``
    (``correct``, ``nll_sum`` and ``tokens`` let shards be combined with :func:`merge_metrics`;
    ``row_ids`` / ``row_correct``: each row's id and 0/1 correctness, in row order); with
    ``return_details`` also ``predictions`` (the predicted option or generated text per row) and
    ``scores`` (per-row option scores). ``batch_size`` is the number of rows per forward (capped at
    about ``batch_size * max_length`` tokens). ``packed=None`` uses the tree layout of
    :mod:`rlora.data.scoring` when the attention kernel takes a 4-D mask, else one sequence per
    option. The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = list(examples)
    if not examples:
        return {**_metrics(0, 0, 0.0, 0), "row_ids": [], "row_correct": []}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            rows = _prepare_rows(tokenizer, examples, max_length, use_chat_template, template)
            free = [i for i, ex in enumerate(examples) if ex.options is None]
            scored = score_options(model, rows, pad, batch_size, max_length, task_id, packed,
                                   on_rows if not free else None)
            generated: dict[int, str] = {}
            if free:
                prompts = [rows[i].prompt[-max(1, max_length - max_new_tokens):] for i in free]
                generated = dict(zip(free, _generate(model, tokenizer, prompts, batch_size, max_new_tokens, task_id)))
                if on_rows:
                    on_rows(len(examples))
    finally:
        model.train(was_training)
    return _score_rows(examples, scored, generated, length_normalized, return_details)


def _score_rows(examples: Sequence[Example], scored, generated: Mapping[int, str], length_normalized: bool,
                return_details: bool) -> dict:
    """The metrics of one task from its option scores (and generated texts of its free-form rows)."""
    nll, tokens = 0.0, 0
    predictions, scores, row_correct = [], [], []
    for i, (ex, opts) in enumerate(zip(examples, scored)):
        values = [s / max(n, 1) if length_normalized else s for s, n in opts]
        if ex.options is None:
            pred = generated[i]
            hit = normalize_answer(pred) == normalize_answer(ex.target)
            gold = 0
        else:
            best = max(range(len(values)), key=values.__getitem__)
            pred = ex.options[best]
            gold = ex.options.index(ex.target)
            hit = pred == ex.target                      # a duplicated gold option counts as correct
        nll -= opts[gold][0]
        tokens += opts[gold][1]
        row_correct.append(int(hit))
        predictions.append(pred)
        scores.append(values)
    result = _metrics(sum(row_correct), len(examples), nll, tokens)
    result["row_ids"] = [ex.id for ex in examples]
    result["row_correct"] = row_correct
    if return_details:
        result["predictions"] = predictions
        result["scores"] = scores
    return result


def evaluate_tasks(model, tokenizer, tasks: Mapping[str, Sequence[Example]], task_names: Sequence[str],
                   batch_size: int = 16, length_normalized: bool = False, max_length: int = 256,
                   use_chat_template: bool = True, templates: Optional[Mapping[str, Optional[str]]] = None,
                   max_examples_per_task: Optional[int] = None, rank: int = 0, world_size: int = 1,
                   progress: bool = True) -> dict[str, dict]:
    """``task -> metrics`` for every task in ``tasks``.

    Task ``name`` is routed to adapter head ``task_names.index(name)`` (no routing for names not in
    ``task_names``). With ``world_size > 1`` each rank scores its :func:`shard` of every task; combine
    the ranks' results per task with :func:`merge_metrics`. ``max_examples_per_task`` keeps the first rows.

    Tasks whose rows all have options and that are in ``task_names`` are scored together, their rows
    sharing batches (each routed to its task): with many small tasks one task at a time costs a forward
    pass per task even for 2 rows. Free-form tasks and unrouted ones go one at a time.

    Each task's metrics are those of :func:`evaluate_multiple_choice` plus ``row_index``: the position
    of each scored row among the task's (first ``max_examples_per_task``) rows, so that the per-row
    lists ``row_ids`` / ``row_correct`` of the shards merge back into the original row order.
    """
    from tqdm.auto import tqdm

    templates = templates or {}
    names = list(task_names)
    selected = {name: shard(list(enumerate(list(exs)[:max_examples_per_task])), rank, world_size)
                for name, exs in tasks.items()}
    results: dict[str, dict] = {}
    with tqdm(total=sum(len(v) for v in selected.values()), desc="eval", unit="ex", disable=not progress) as bar:
        # option rows of routed tasks: scored together, batches mixing tasks (one id per row)
        batched = [n for n, exs in selected.items() if n in names and exs and all(ex.options is not None
                                                                                   for _, ex in exs)]
        if len(batched) > 1:
            results.update(_evaluate_across_tasks(model, tokenizer, {n: [ex for _, ex in selected[n]] for n in batched},
                                                  names, batch_size, length_normalized, max_length,
                                                  use_chat_template, templates, bar.update))
        for name in batched if len(batched) > 1 else ():
            results[name]["row_index"] = [i for i, _ in selected[name]]
        for name, exs in selected.items():
            if name in results:
                continue
            bar.set_postfix_str(name)
            results[name] = evaluate_multiple_choice(
                model, tokenizer, [ex for _, ex in exs], batch_size=batch_size, length_normalized=length_normalized,
                max_length=max_length, task_id=names.index(name) if name in names else None,
                use_chat_template=use_chat_template, template=templates.get(name), on_rows=bar.update)
            results[name]["row_index"] = [i for i, _ in exs]
    return {name: results[name] for name in selected}


def _evaluate_across_tasks(model, tokenizer, tasks: Mapping[str, Sequence[Example]], names: Sequence[str],
                           batch_size: int, length_normalized: bool, max_length: int, use_chat_template: bool,
                           templates: Mapping[str, Optional[str]], on_rows) -> dict[str, dict]:
    """:func:`evaluate_multiple_choice` of every task in ``tasks`` (option rows only), with the rows of
    all tasks in one :func:`score_options` call: a forward holds up to ``batch_size`` rows whatever
    their task, each routed to its own (at 200 tasks of 2 dev rows, ~13x fewer forwards than one task
    at a time). The same scores up to float rounding (batch composition changes padding)."""
    rows, ids, spans = [], [], {}
    for name, exs in tasks.items():
        start = len(rows)
        rows += _prepare_rows(tokenizer, exs, max_length, use_chat_template, templates.get(name))
        ids += [names.index(name)] * len(exs)
        spans[name] = (start, len(rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scored = score_options(model, rows, pad, batch_size, max_length, ids, None, on_rows)
    finally:
        model.train(was_training)
    return {name: _score_rows(list(tasks[name]), scored[a:b], {}, length_normalized, False)
            for name, (a, b) in spans.items()}


def macro_average(results: Mapping[str, Mapping]) -> dict[str, float]:
    """Unweighted mean of accuracy and loss over tasks."""
    accs = [r["accuracy"] for r in results.values() if r["n"]]
    losses = [r["loss"] for r in results.values() if r["n"]]
    return {"accuracy": sum(accs) / len(accs) if accs else float("nan"),
            "loss": sum(losses) / len(losses) if losses else float("nan")}


__all__ = ["evaluate_multiple_choice", "evaluate_tasks", "merge_metrics", "macro_average", "shard",
           "normalize_answer", "score_options", "supports_packing", "build_trie", "ROW_KEYS"]
