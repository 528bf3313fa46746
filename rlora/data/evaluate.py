"""Evaluation: log-likelihood scoring of answer options, exact match for free-form answers.

Option scoring. For a row with prompt tokens ``p`` and options ``o_1 .. o_K`` (each = answer tokens +
eos, as in training), the score of option k is

    s_k = sum_j log P(o_k[j] | p, o_k[:j])          (divided by len(o_k) when length_normalized)

and the prediction is ``argmax_k s_k``. ``loss`` is the per-token negative log-likelihood of the
target option, ``sum(-s_gold) / sum(len(o_gold))`` -- the training loss measured on this split.

Packing. The prompt is shared by all options, and options often share their first tokens (label
sets like ``card_arrival`` / ``card_linking``), so each row is one packed sequence: the prompt, then
the nodes of the prefix tree (trie) of its options. Node positions are ``|p| + depth`` and a 4-D
attention mask lets a node see the prompt, its ancestors and itself only. Each node's log-prob is
computed once, and ``s_k`` sums the nodes on option k's path -- exactly the log-probabilities of K
separate sequences ``p ++ o_k``, for the price of one prompt and the distinct prefixes. Several rows
are padded into one batch (one forward per batch). Models whose attention kernel cannot take a 4-D
mask (e.g. flash-attention) use the plain layout: one right-padded sequence per (row, option).

Only the hidden states at the option positions go through the output layer and the softmax:
``h[b, src] -> lm_head -> log_softmax -> gather`` on N rows, never on all B x L positions.

Free-form rows (``options`` is None) are scored by greedy generation: accuracy is the exact match of
the normalised text (lowercase, collapsed whitespace, outer punctuation stripped) with the target;
``loss`` is the NLL of the target as above.

With ``task_id`` the forward runs inside ``rlora.task_ids(...)`` so multi-head adapters route every
row to that task (a model without adapters ignores it).
"""
from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, TypeVar

import torch

from .example import Example
from .prompts import build_prompt
from .tokenization import answer_token_ids, prompt_token_ids

T = TypeVar("T")
HEAD_CHUNK = 2048


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def shard(examples: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rows ``rank, rank + world_size, ...``: disjoint shards that together cover every row once."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(examples[rank::world_size])


def merge_metrics(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine the metrics of disjoint shards (sums of ``correct``, ``n``, ``nll_sum``, ``tokens``)."""
    correct = sum(p["correct"] for p in parts)
    n = sum(p["n"] for p in parts)
    nll = sum(p["nll_sum"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    return _metrics(correct, n, nll, tokens)


def _metrics(correct: float, n: int, nll: float, tokens: int) -> dict[str, float]:
    return {"accuracy": correct / n if n else float("nan"), "n": int(n),
            "loss": nll / tokens if tokens else float("nan"),
            "correct": float(correct), "nll_sum": float(nll), "tokens": int(tokens)}


def normalize_answer(text: str) -> str:
    return " ".join(text.split()).lower().strip(string.punctuation + " ")


def _task_context(task_id: Optional[int], batch: int, device: torch.device):
    if task_id is None:
        return contextlib.nullcontext()
    try:
        from rlora.context import task_ids
    except ImportError:  # adapters not available: the base model has nothing to route
        return contextlib.nullcontext()
    return task_ids(torch.full((batch,), int(task_id), dtype=torch.long, device=device))


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _decoder_and_head(model):
    """(decoder, output layer) when logits are exactly ``head(decoder(x))``, else None."""
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if not callable(get_dec) or not callable(get_head):
        return None
    dec, head = get_dec(), get_head()
    if dec is None or head is None or dec is model:
        return None
    return dec, head


def supports_packing(model) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in (None, "eager", "sdpa")


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
@dataclass
class _Trie:
    """Prefix tree of a row's options. Node i holds ``tokens[i]``; ``parent[i]`` is -1 for a first
    token (its context is the prompt); parents come before children; ``paths[k]`` lists option k's nodes."""

    tokens: list[int]
    parent: list[int]
    depth: list[int]
    paths: list[list[int]]


def build_trie(options: Sequence[Sequence[int]]) -> _Trie:
    tokens: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    index: dict[tuple[int, int], int] = {}
    paths = []
    for o in options:
        cur, path = -1, []
        for t in o:
            node = index.get((cur, t))
            if node is None:
                node = index[(cur, t)] = len(tokens)
                tokens.append(t)
                parent.append(cur)
                depth.append(0 if cur < 0 else depth[cur] + 1)
            path.append(node)
            cur = node
        paths.append(path)
    return _Trie(tokens, parent, depth, paths)


@dataclass
class _Row:
    prompt: list[int]
    options: list[list[int]]

    def __post_init__(self) -> None:
        self.trie = build_trie(self.options)

    @property
    def packed_length(self) -> int:
        return len(self.prompt) + len(self.trie.tokens)


def _prepare_rows(tokenizer, examples: Sequence[Example], max_length: int, use_chat_template: bool,
                  template: Optional[str]) -> list[_Row]:
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
        rows.append(_Row(p, [o[:room] for o in ids]))
    return rows


def _token_logprobs(model, input_ids, attention_mask, position_ids, b_idx, src, tok) -> torch.Tensor:
    """log P(tok[i] | position src[i] of row b_idx[i]) for the N requested tokens -> [N] float32."""
    split = _decoder_and_head(model)
    if split is not None:
        dec, head = split
        out = dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        picked = hidden[b_idx, src]                                                    # [N, H]
        project = head
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        picked = logits[b_idx, src]                                                    # [N, V]
        project = None
    res = []
    for i in range(0, picked.shape[0], HEAD_CHUNK):
        chunk = picked[i:i + HEAD_CHUNK]
        logits = (project(chunk) if project is not None else chunk).float()
        res.append(torch.log_softmax(logits, dim=-1).gather(1, tok[i:i + HEAD_CHUNK, None]).squeeze(1))
    return torch.cat(res) if res else torch.zeros(0)


def _packed_batch(rows: Sequence[_Row], pad_id: int, device, dtype):
    """Packed rows ``prompt ++ trie nodes`` and their 4-D additive mask [B, 1, L, L].

    A prompt token sees the earlier prompt tokens; a trie node sees the whole prompt, its ancestors
    and itself; its position id is ``len(prompt) + depth``. Returns the tensors and, for every node,
    (row, source position, token): node i is predicted at its parent's position (the last prompt
    token for a first token).
    """
    width = max(r.packed_length for r in rows)
    bsz = len(rows)
    ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    pos = torch.zeros((bsz, width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(bsz, 1, 1)          # padding rows keep one entry
    b_idx, src, tok = [], [], []
    for b, r in enumerate(rows):
        n, trie = len(r.prompt), r.trie
        m = len(trie.tokens)
        ids[b, :n] = torch.tensor(r.prompt, dtype=torch.long)
        ids[b, n:n + m] = torch.tensor(trie.tokens, dtype=torch.long)
        pos[b, :n] = torch.arange(n)
        pos[b, n:n + m] = n + torch.tensor(trie.depth, dtype=torch.long)
        allowed[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[b, n:n + m, :n] = True
        block = allowed[b, n:n + m, n:n + m]                                 # ancestor-or-self
        for i, par in enumerate(trie.parent):
            if par >= 0:
                block[i] = block[par]
            block[i, i] = True
        b_idx += [b] * m
        src += [n - 1 if par < 0 else n + par for par in trie.parent]
        tok += trie.tokens
    mask = torch.zeros((bsz, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return (ids.to(device), mask.to(device), pos.to(device),
            torch.tensor(b_idx, device=device), torch.tensor(src, device=device), torch.tensor(tok, device=device))


def _plain_batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, device):
    """Right-padded ``prompt ++ option`` sequences with a 2-D mask."""
    width = max(len(p) + len(o) for p, o in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    b_idx, src, tok = [], [], []
    for b, (p, o) in enumerate(seqs):
        n, m = len(p), len(o)
        ids[b, :n + m] = torch.tensor(p + o, dtype=torch.long)
        mask[b, :n + m] = 1
        b_idx += [b] * m
        src += list(range(n - 1, n + m - 1))
        tok += o
    pos = torch.arange(width).expand(len(seqs), width).contiguous()
    return (ids.to(device), mask.to(device), pos.to(device), torch.tensor(b_idx, device=device),
            torch.tensor(src, device=device), torch.tensor(tok, device=device))


def _batches_by_budget(order: Sequence[int], lengths: Sequence[int], batch_size: int, token_budget: int):
    """Consecutive groups of ``order`` (sorted longest first) with at most batch_size items and
    at most token_budget padded tokens (a single longer item still forms its own batch)."""
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1 > batch_size or (len(batch) + 1) * lengths[batch[0]] > token_budget):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def score_options(model, rows: Sequence[_Row], pad_id: int, batch_size: int, max_length: int,
                  task_id: Optional[int] = None, packed: Optional[bool] = None,
                  on_rows: Optional[Callable[[int], None]] = None) -> list[list[tuple[float, int]]]:
    """``(sum log-prob, number of tokens)`` for every option of every row."""
    device, dtype = _model_device_dtype(model)
    packed = supports_packing(model) if packed is None else packed
    out: list[list[tuple[float, int]]] = [[(0.0, len(o)) for o in r.options] for r in rows]
    budget = batch_size * max_length
    if packed:
        lengths = [r.packed_length for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -lengths[i])
        for group in _batches_by_budget(order, lengths, batch_size, budget):
            ids, mask, pos, b_idx, src, tok = _packed_batch([rows[i] for i in group], pad_id, device, dtype)
            with _task_context(task_id, len(group), device):
                lp = _token_logprobs(model, ids, mask, pos, b_idx, src, tok).tolist()
            offset = 0
            for i in group:
                trie = rows[i].trie
                for k, path in enumerate(trie.paths):
                    out[i][k] = (sum(lp[offset + node] for node in path), len(path))
                offset += len(trie.tokens)
            if on_rows:
                on_rows(len(group))
    else:
        pairs = [(i, k) for i, r in enumerate(rows) for k in range(len(r.options))]
        lengths = [len(rows[i].prompt) + len(rows[i].options[k]) for i, k in pairs]
        order = sorted(range(len(pairs)), key=lambda j: -lengths[j])
        done = [0] * len(rows)
        for group in _batches_by_budget(order, lengths, batch_size, budget):
            seqs = [(rows[pairs[j][0]].prompt, rows[pairs[j][0]].options[pairs[j][1]]) for j in group]
            ids, mask, pos, b_idx, src, tok = _plain_batch(seqs, pad_id, device)
            with _task_context(task_id, len(group), device):
                lp = _token_logprobs(model, ids, mask, pos, b_idx, src, tok)
            sums = [0.0] * len(group)
            for b, v in zip(b_idx.tolist(), lp.tolist()):
                sums[b] += v
            finished = 0
            for j, v in zip(group, sums):
                i, k = pairs[j]
                out[i][k] = (v, out[i][k][1])
                done[i] += 1
                finished += done[i] == len(rows[i].options)
            if on_rows and finished:
                on_rows(finished)
    return out


# ----------------------------------------------------------------------------------------------
# generation (free-form answers)
# ----------------------------------------------------------------------------------------------
def _generate(model, tokenizer, prompts: Sequence[list[int]], batch_size: int, max_new_tokens: int,
              task_id: Optional[int]) -> list[str]:
    device, _ = _model_device_dtype(model)
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
        with _task_context(task_id, len(batch), device):
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

    Returns ``{"accuracy", "n", "loss", "correct", "nll_sum", "tokens"}`` (the last three let shards be
    combined with :func:`merge_metrics`); with ``return_details`` also ``predictions`` (the predicted
    option or generated text per row) and ``scores`` (per-row option scores). ``batch_size`` is the
    number of packed rows per forward (capped at ``batch_size * max_length`` tokens). ``packed=None``
    packs when the attention kernel allows it. The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = list(examples)
    if not examples:
        return _metrics(0, 0, 0.0, 0)
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
    correct, nll, tokens = 0, 0.0, 0
    predictions, scores = [], []
    for i, (ex, opts) in enumerate(zip(examples, scored)):
        values = [s / max(n, 1) if length_normalized else s for s, n in opts]
        if ex.options is None:
            pred = generated[i]
            correct += normalize_answer(pred) == normalize_answer(ex.target)
            gold = 0
        else:
            best = max(range(len(values)), key=values.__getitem__)
            pred = ex.options[best]
            gold = ex.options.index(ex.target)
            correct += pred == ex.target                 # a duplicated gold option counts as correct
        nll -= opts[gold][0]
        tokens += opts[gold][1]
        predictions.append(pred)
        scores.append(values)
    result = _metrics(correct, len(examples), nll, tokens)
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
    """
    from tqdm.auto import tqdm

    templates = templates or {}
    names = list(task_names)
    selected = {name: shard(list(exs)[:max_examples_per_task], rank, world_size) for name, exs in tasks.items()}
    results: dict[str, dict] = {}
    with tqdm(total=sum(len(v) for v in selected.values()), desc="eval", unit="ex", disable=not progress) as bar:
        for name, exs in selected.items():
            bar.set_postfix_str(name)
            results[name] = evaluate_multiple_choice(
                model, tokenizer, exs, batch_size=batch_size, length_normalized=length_normalized,
                max_length=max_length, task_id=names.index(name) if name in names else None,
                use_chat_template=use_chat_template, template=templates.get(name), on_rows=bar.update)
    return results


def macro_average(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of accuracy and loss over tasks."""
    accs = [r["accuracy"] for r in results.values() if r["n"]]
    losses = [r["loss"] for r in results.values() if r["n"]]
    return {"accuracy": sum(accs) / len(accs) if accs else float("nan"),
            "loss": sum(losses) / len(losses) if losses else float("nan")}
