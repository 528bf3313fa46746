"""Log-likelihood of every answer option of every row: the forwards behind :mod:`rlora.data.evaluate`.

For a row with prompt tokens ``p`` and options ``o_1 .. o_K`` (answer tokens + eos) the result is
``s_k = sum_j log P(o_k[j] | p, o_k[:j])`` and ``len(o_k)`` for every option.

Tree layout (models whose attention takes a 4-D mask: eager, sdpa). Three kinds of forward, each
with an explicit additive mask [b, 1, q, past + q] and explicit position ids:

1. *shared prefix*, once per call: the longest token prefix ``c`` common to all prompts (the chat
   template's system turn: 24 tokens for SmolLM2), batch 1; its keys/values serve every row.
2. *prompts*: ``p[c:]`` of each row, right-padded [B, P], causal, on top of the prefix. Yields the
   last prompt token's hidden state and the keys/values of the whole prompt.
3. *option trees*: the internal nodes of each row's trie (:mod:`rlora.data.option_trie`) in bins
   [S, W]; a bin sees its row's prompt (from the cache) and, inside the bin, a node's ancestors and
   itself. Node position = ``len(p) + depth``.

A masked key gets weight exp(min) = 0, so every node sees exactly ``p ++ its ancestors``: the scores
are those of K separate sequences ``p ++ o_k``, up to float rounding. Compared with one packed
sequence ``p ++ trie`` per row: the shared prefix runs once instead of once per row, leaves (one eos
per option) are not fed, attention is ``W x (|p| + W)`` per bin instead of ``|trie| x (|p| + |trie|)``,
and the output layer (``h -> lm_head -> log_softmax``) runs once per distinct source state (last
prompt token + internal nodes) instead of once per node. For a banking77 row (77 labels, 459 trie
nodes, 382 of them internal) that is ~400 fed tokens instead of ~500 and 383 output rows instead of
459. Measured once (SmolLM2-135M, fp32, one thread, shared machine: CPU seconds, mtl_cpu6 dev, 200
rows per task): banking77 297 -> 244 s, all six tasks 472 -> 377 s, with identical predictions and
option scores within 1.04e-4 of the packed layout (fp32 rounding; the packed and plain layouts
differ by as much).

Plain layout (any attention kernel, e.g. flash-attention): one right-padded sequence per (row, option).

With ``task_id`` every forward runs inside ``rlora.task_ids(...)`` with one id per sequence of that
forward, so per-sample adapters (MTL-LoRA) route each sequence to the task; per-token routers
(HydraLoRA, R-LoRA) see the same tokens as in a plain forward.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .option_trie import Trie, build_trie, pack_subtrees

HEAD_CHUNK = 2048      # source states per output-layer call (bounds the [chunk, vocab] logits)
BIN_TOKENS = 64        # target number of trie nodes per bin (a larger first-token subtree gets its own bin)


@dataclass
class Row:
    """A row's prompt ids and option ids (each ending with eos), with its trie and bins."""

    prompt: list[int]
    options: list[list[int]]
    trie: Trie = field(init=False)

    def __post_init__(self) -> None:
        self.trie = build_trie(self.options)
        self._bins: Optional[list[list[int]]] = None

    @property
    def bins(self) -> list[list[int]]:
        if self._bins is None:
            self._bins = pack_subtrees(self.trie, BIN_TOKENS)
        return self._bins

    @property
    def packed_length(self) -> int:
        return len(self.prompt) + len(self.trie.tokens)


# ----------------------------------------------------------------------------------------------
# model plumbing
# ----------------------------------------------------------------------------------------------
def task_context(task_id, batch: int, device: torch.device):
    """``rlora.task_ids`` with ``batch`` copies of ``task_id``, or with ``task_id`` itself when it is a
    tensor of one id per sequence (nothing when ``task_id`` is None)."""
    if task_id is None:
        return contextlib.nullcontext()
    try:
        from rlora.context import task_ids
    except ImportError:  # adapters not available: the base model has nothing to route
        return contextlib.nullcontext()
    if isinstance(task_id, torch.Tensor):
        return task_ids(task_id.to(device=device, dtype=torch.long))
    return task_ids(torch.full((batch,), int(task_id), dtype=torch.long, device=device))


def _row_tasks(task_id, n: int) -> tuple[Optional[int], Optional[list[int]]]:
    """(one task id for every row, or None; else the list of per-row ids). A sequence of equal ids is
    one id, so that a one-task call runs exactly the forwards it ran before per-row ids existed."""
    if task_id is None or isinstance(task_id, int):
        return task_id, None
    ids = [int(t) for t in task_id]
    if len(ids) != n:
        raise ValueError(f"score_options: {len(ids)} task ids for {n} rows: give one id per row")
    return (ids[0], None) if len(set(ids)) == 1 else (None, ids)


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def decoder_and_head(model):
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


KV = list[tuple[torch.Tensor, torch.Tensor]]       # per decoder layer: keys, values [b, kv_heads, len, d]


def _kv_of(cache) -> KV:
    if hasattr(cache, "layers"):                                   # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(kv[0], kv[1]) for kv in cache]                        # legacy tuple of tuples


def _cache_from(kv: KV):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def _cache_kwarg(module) -> str:
    """The forward's name for the key/value cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    if isinstance(out, tuple):
        return out[1]
    for key in ("cache", "past_key_values"):
        if key in out.keys():
            return out[key]
    raise TypeError(f"{type(out).__name__} holds no key/value cache: the model must return one with use_cache=True")


def _additive(allowed: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """[b, q, k] booleans -> [b, 1, q, k] additive mask (0 where allowed, dtype-min elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(device)


def _forward(model, split, ids, allowed, pos, past: Optional[KV], task_id, need_cache: bool):
    """(states [b, q, H] (logits [b, q, V] without a decoder/head split), keys/values or None)."""
    device, dtype = model_device_dtype(model)
    module = split[0] if split is not None else model
    kw = {"input_ids": ids.to(device), "attention_mask": _additive(allowed, dtype, device),
          "position_ids": pos.to(device), "use_cache": True}
    if past is not None:
        kw[_cache_kwarg(module)] = _cache_from(past)
    with task_context(task_id, ids.shape[0], device):
        out = module(**kw)
    if isinstance(out, tuple):
        states = out[0]
    else:
        states = out.last_hidden_state if split is not None else out.logits
    return states, (_kv_of(_returned_cache(out)) if need_cache else None)


def _log_probs(head, states: torch.Tensor, src: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """``log softmax(head(states[src[n]]))[tok[n]]`` for every n -> [N] float32; each state goes
    through the output layer once (in chunks of HEAD_CHUNK states)."""
    out = torch.zeros(src.shape[0], dtype=torch.float32, device=states.device)
    order = torch.argsort(src, stable=True)
    s_sorted, t_sorted = src[order], tok[order]
    for a in range(0, states.shape[0], HEAD_CHUNK):
        b = min(a + HEAD_CHUNK, states.shape[0])
        lo, hi = (int(x) for x in torch.searchsorted(s_sorted, torch.tensor([a, b], device=src.device)))
        if lo == hi:
            continue
        logits = (head(states[a:b]) if head is not None else states[a:b]).float()
        logp = torch.log_softmax(logits, dim=-1)
        out[order[lo:hi]] = logp[s_sorted[lo:hi] - a, t_sorted[lo:hi]]
    return out


# ----------------------------------------------------------------------------------------------
# tree layout
# ----------------------------------------------------------------------------------------------
def shared_prefix_length(rows: Sequence[Row]) -> int:
    """Longest common token prefix of the prompts, leaving at least one own token per prompt."""
    if not rows:
        return 0
    first, limit = rows[0].prompt, min(len(r.prompt) for r in rows) - 1
    c = 0
    while c < limit and all(r.prompt[c] == first[c] for r in rows):
        c += 1
    return c


def _prompt_stage(rows: Sequence[Row], c: int, pad_id: int):
    """ids [B, P] of ``p[c:]`` (right-padded), causal mask [B, P, c + P] over prefix + own tokens,
    positions ``c + j``."""
    rest = [r.prompt[c:] for r in rows]
    width = max(len(x) for x in rest)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, x in enumerate(rest):
        ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
    allowed = torch.ones(len(rows), width, c + width, dtype=torch.bool)
    allowed[:, :, c:] = torch.ones(width, width, dtype=torch.bool).tril()
    pos = (c + torch.arange(width)).expand(len(rows), width).contiguous()
    return ids, allowed, pos, [len(x) for x in rest]


def _tree_stage(rows: Sequence[Row], c: int, own: Sequence[int], pad_id: int):
    """The bins of every row: ids [S, W], mask [S, W, c + P + W] (prefix, the row's own prompt
    tokens, ancestor-or-self inside the bin), positions ``len(p) + depth``, the row of each bin,
    and (row, node, bin, column) of every internal node, in source order."""
    bins = [(b, nodes) for b, r in enumerate(rows) for nodes in r.bins]
    S, width, prompt_width = len(bins), max(len(n) for _, n in bins), max(own)
    tok = [[pad_id] * width for _ in range(S)]
    pos = [[0] * width for _ in range(S)]
    parent_col = [[-1] * width for _ in range(S)]                  # column of the parent in the bin, -1: none
    slots: list[tuple[int, int, int, int]] = []
    for s, (b, nodes) in enumerate(bins):
        trie, n_prompt = rows[b].trie, len(rows[b].prompt)
        col = {node: j for j, node in enumerate(nodes)}
        for j, node in enumerate(nodes):
            tok[s][j] = trie.tokens[node]
            pos[s][j] = n_prompt + trie.depth[node]
            parent_col[s][j] = col.get(trie.parent[node], -1)      # a subtree never leaves its bin
            slots.append((b, node, s, j))
    bin_row = torch.tensor([b for b, _ in bins], dtype=torch.long)
    allowed = torch.zeros(S, width, c + prompt_width + width, dtype=torch.bool)
    allowed[:, :, :c] = True
    own_len = torch.tensor(own, dtype=torch.long)[bin_row]
    allowed[:, :, c:c + prompt_width] = (torch.arange(prompt_width)[None, :] < own_len[:, None])[:, None, :]
    tree = allowed[:, :, c + prompt_width:]                        # [S, W, W] view: ancestor-or-self
    j_idx = torch.arange(width)
    tree[:, j_idx, j_idx] = True
    parent = torch.tensor(parent_col, dtype=torch.long)
    s_idx, j_idx = torch.arange(S)[:, None].expand(S, width), j_idx[None, :].expand(S, width)
    anc = parent
    while bool((anc >= 0).any()):                                  # one step up the tree per pass
        m = anc >= 0
        tree[s_idx[m], j_idx[m], anc[m]] = True
        anc = torch.where(m, parent.gather(1, anc.clamp(min=0)), anc)
    return torch.tensor(tok, dtype=torch.long), allowed, torch.tensor(pos, dtype=torch.long), bin_row, slots


def _score_group(model, split, rows: Sequence[Row], c: int, prefix: Optional[KV], pad_id: int,
                 task_id, prefix_rows: Optional[list[int]] = None) -> list[list[float]]:
    """log-prob of every trie node of every row in ``rows`` (one prompt forward + one tree forward).
    ``task_id``: one id, or a tensor of one id per row; ``prefix_rows``: each row's entry of a prefix
    computed once per task (None: the prefix has one entry, shared by every row)."""
    device, _ = model_device_dtype(model)
    B = len(rows)
    ids, allowed, pos, own = _prompt_stage(rows, c, pad_id)
    if prefix and prefix_rows is not None:
        sel = torch.tensor(prefix_rows, device=prefix[0][0].device)
        past = [(k.index_select(0, sel), v.index_select(0, sel)) for k, v in prefix]
    else:
        past = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix] if prefix else None
    states, kv = _forward(model, split, ids, allowed, pos, past, task_id, need_cache=True)
    sources = [states[torch.arange(B, device=states.device), torch.tensor(own, device=states.device) - 1]]
    source_of: dict[tuple[int, int], int] = {}                    # (row, internal node) -> source index
    if any(r.trie.internal for r in rows):
        ids, allowed, pos, bin_row, slots = _tree_stage(rows, c, own, pad_id)
        sel = bin_row.to(kv[0][0].device)
        past = [(k.index_select(0, sel), v.index_select(0, sel)) for k, v in kv]
        del kv
        bin_tasks = task_id[bin_row.to(task_id.device)] if isinstance(task_id, torch.Tensor) else task_id
        states, _ = _forward(model, split, ids, allowed, pos, past, bin_tasks, need_cache=False)
        del past
        s_idx = torch.tensor([s for _, _, s, _ in slots], device=states.device)
        j_idx = torch.tensor([j for _, _, _, j in slots], device=states.device)
        sources.append(states[s_idx, j_idx])
        source_of = {(b, node): B + k for k, (b, node, _, _) in enumerate(slots)}
    src, tok = [], []
    for b, r in enumerate(rows):
        for node, (t, par) in enumerate(zip(r.trie.tokens, r.trie.parent)):
            src.append(b if par < 0 else source_of[(b, par)])
            tok.append(t)
    lp = _log_probs(split[1] if split is not None else None, torch.cat(sources),
                    torch.tensor(src, device=device), torch.tensor(tok, device=device)).tolist()
    out, offset = [], 0
    for r in rows:
        out.append(lp[offset:offset + len(r.trie.tokens)])
        offset += len(r.trie.tokens)
    return out


def _prefix_cache(model, split, prefix: list[int], distinct: Optional[list[int]], one, batch_size: int) -> KV:
    """Keys/values of the shared prefix, one entry per task in ``distinct`` (None: one entry, task ``one``):
    forwards of at most ``batch_size`` tasks each (hundreds of tasks would otherwise be one forward of hundreds
    of rows), concatenated along the batch dimension -> per layer (k, v) [n, heads, c, head_dim]."""
    c, n = len(prefix), len(distinct) if distinct else 1
    parts = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.tensor([prefix] * b, dtype=torch.long)
        allowed = torch.ones(c, c, dtype=torch.bool).tril()[None].expand(b, c, c)
        tasks = torch.tensor(distinct[start:start + b]) if distinct else one
        parts.append(_forward(model, split, ids, allowed, torch.arange(c)[None].expand(b, c), None, tasks,
                              need_cache=True)[1])
    if len(parts) == 1:
        return parts[0]
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


def _score_tree(model, rows: Sequence[Row], pad_id: int, batch_size: int, max_length: int,
                task_id, on_rows) -> list[list[tuple[float, int]]]:
    split = decoder_and_head(model)
    one, per_row = _row_tasks(task_id, len(rows))
    c = shared_prefix_length(rows)
    prefix, distinct = None, None
    if c:  # the prefix's keys/values depend on the task's adapter: once per task present
        distinct = sorted(set(per_row)) if per_row is not None else None
        prefix = _prefix_cache(model, split, rows[0].prompt[:c], distinct, one, batch_size)
    costs = [len(r.prompt) - c + len(r.trie.internal) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -costs[i])
    out: list[list[tuple[float, int]]] = [[] for _ in rows]
    for group in _batches_by_budget(order, costs, batch_size, batch_size * max_length):
        tasks = torch.tensor([per_row[i] for i in group]) if per_row is not None else one
        where = [distinct.index(per_row[i]) for i in group] if distinct else None
        node_lp = _score_group(model, split, [rows[i] for i in group], c, prefix, pad_id, tasks, where)
        for i, lp in zip(group, node_lp):
            out[i] = [(sum(lp[n] for n in path), len(path)) for path in rows[i].trie.paths]
        if on_rows:
            on_rows(len(group))
    return out


# ----------------------------------------------------------------------------------------------
# plain layout
# ----------------------------------------------------------------------------------------------
def _token_logprobs(model, input_ids, attention_mask, position_ids, b_idx, src, tok) -> torch.Tensor:
    """log P(tok[i] | position src[i] of row b_idx[i]) for the N requested tokens -> [N] float32."""
    split = decoder_and_head(model)
    if split is not None:
        dec, head = split
        out = dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        picked, project = hidden[b_idx, src], head                                     # [N, H]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        picked, project = logits[b_idx, src], None                                     # [N, V]
    return _log_probs(project, picked, torch.arange(picked.shape[0], device=picked.device), tok)


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


def _score_plain(model, rows: Sequence[Row], pad_id: int, batch_size: int, max_length: int,
                 task_id, on_rows) -> list[list[tuple[float, int]]]:
    device, _ = model_device_dtype(model)
    one, per_row = _row_tasks(task_id, len(rows))
    out: list[list[tuple[float, int]]] = [[(0.0, len(o)) for o in r.options] for r in rows]
    pairs = [(i, k) for i, r in enumerate(rows) for k in range(len(r.options))]
    lengths = [len(rows[i].prompt) + len(rows[i].options[k]) for i, k in pairs]
    order = sorted(range(len(pairs)), key=lambda j: -lengths[j])
    done = [0] * len(rows)
    for group in _batches_by_budget(order, lengths, batch_size, batch_size * max_length):
        seqs = [(rows[pairs[j][0]].prompt, rows[pairs[j][0]].options[pairs[j][1]]) for j in group]
        ids, mask, pos, b_idx, src, tok = _plain_batch(seqs, pad_id, device)
        tasks = torch.tensor([per_row[pairs[j][0]] for j in group]) if per_row is not None else one
        with task_context(tasks, len(group), device):
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


def score_options(model, rows: Sequence[Row], pad_id: int, batch_size: int, max_length: int,
                  task_id: Optional[Union[int, Sequence[int]]] = None, packed: Optional[bool] = None,
                  on_rows: Optional[Callable[[int], None]] = None) -> list[list[tuple[float, int]]]:
    """``(sum log-prob, number of tokens)`` for every option of every row. ``packed`` chooses the tree
    layout (default: when the attention kernel takes a 4-D mask) or the plain layout. A batch holds
    at most ``batch_size`` rows and about ``batch_size * max_length`` fed tokens. ``task_id``: one task
    for every row, or one per row (rows of many tasks share batches; each sequence is routed to its own
    task, the shared prefix runs once per task)."""
    if not rows:
        return []
    packed = supports_packing(model) if packed is None else packed
    score = _score_tree if packed else _score_plain
    return score(model, rows, pad_id, batch_size, max_length, task_id, on_rows)


__all__ = ["Row", "score_options", "supports_packing", "shared_prefix_length", "task_context",
           "decoder_and_head", "model_device_dtype", "HEAD_CHUNK", "BIN_TOKENS"]
