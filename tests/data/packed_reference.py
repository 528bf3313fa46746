"""The previous option scorer (one packed sequence per row), kept as the oracle for the current one.

It packs each row into one sequence ``prompt ++ all trie nodes`` (leaves included) with a 4-D
ancestor mask, runs the whole sequence in one forward and sends every node's source state through
the output layer. The current scorer (:mod:`rlora.data.scoring`) must give the same option
log-likelihoods (to fp32 rounding) and the same predictions.
"""
import contextlib

import torch

HEAD_CHUNK = 2048


def _task_context(task_id, batch, device):
    if task_id is None:
        return contextlib.nullcontext()
    from rlora.context import task_ids

    return task_ids(torch.full((batch,), int(task_id), dtype=torch.long, device=device))


def _decoder_and_head(model):
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    dec, head = model.get_decoder(), model.get_output_embeddings()
    if dec is None or head is None or dec is model:
        return None
    return dec, head


def _token_logprobs(model, input_ids, attention_mask, position_ids, b_idx, src, tok):
    split = _decoder_and_head(model)
    if split is not None:
        dec, head = split
        out = dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        picked, project = out.last_hidden_state[b_idx, src], head
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        picked, project = logits[b_idx, src], None
    res = []
    for i in range(0, picked.shape[0], HEAD_CHUNK):
        chunk = picked[i:i + HEAD_CHUNK]
        logits = (project(chunk) if project is not None else chunk).float()
        res.append(torch.log_softmax(logits, dim=-1).gather(1, tok[i:i + HEAD_CHUNK, None]).squeeze(1))
    return torch.cat(res)


def _packed_batch(rows, pad_id, dtype):
    width = max(len(r.prompt) + len(r.trie.tokens) for r in rows)
    bsz = len(rows)
    ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    pos = torch.zeros((bsz, width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(bsz, 1, 1)
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
        block = allowed[b, n:n + m, n:n + m]
        for i, par in enumerate(trie.parent):
            if par >= 0:
                block[i] = block[par]
            block[i, i] = True
        b_idx += [b] * m
        src += [n - 1 if par < 0 else n + par for par in trie.parent]
        tok += trie.tokens
    mask = torch.zeros((bsz, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return ids, mask, pos, torch.tensor(b_idx), torch.tensor(src), torch.tensor(tok)


@torch.no_grad()
def packed_scores(model, rows, pad_id=0, batch_size=4, task_id=None):
    """``[(sum log-prob, length) per option]`` per row, ``batch_size`` packed rows per forward."""
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    out = []
    for start in range(0, len(rows), batch_size):
        group = rows[start:start + batch_size]
        ids, mask, pos, b_idx, src, tok = _packed_batch(group, pad_id, dtype)
        with _task_context(task_id, len(group), ids.device):
            lp = _token_logprobs(model, ids, mask, pos, b_idx, src, tok).tolist()
        offset = 0
        for r in group:
            out.append([(sum(lp[offset + n] for n in path), len(path)) for path in r.trie.paths])
            offset += len(r.trie.tokens)
    return out
