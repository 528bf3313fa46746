"""Token ids and loss labels for training rows.

``input_ids = prompt_ids + answer_ids`` with ``answer_ids = tokens(answer) + [eos]`` and
``labels = [-100] * len(prompt_ids) + answer_ids``: the loss covers the answer and the end-of-answer
token only. Rows longer than ``max_length`` lose tokens from the left of the prompt (the answer is
always kept whole when it fits) and are marked ``truncated``.
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

from .example import Example
from .prompts import PromptRenderer, answer_text, build_prompt, uses_chat_template

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


def prompt_token_ids(tokenizer, prompts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
    """Tokenise prompts. A rendered chat template already holds its special tokens; the plain layout
    gets the tokenizer's usual start tokens (a trailing eos, if the tokenizer adds one, is dropped)."""
    chat = uses_chat_template(tokenizer, use_chat_template)
    ids = batch_token_ids(tokenizer, list(prompts), add_special_tokens=not chat)
    eos = tokenizer.eos_token_id
    if not chat and eos is not None:
        ids = [x[:-1] if x and x[-1] == eos else x for x in ids]
    return ids


def _backend(tokenizer):
    """The Rust tokenizer behind ``tokenizer`` when calling it directly gives what ``tokenizer(texts)`` gives
    (no truncation or padding set, special tokens handled alike), else ``None``."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if bool(backend.encode_special_tokens) != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def batch_token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=...)["input_ids"]`` as lists. A fast tokenizer's Rust backend is
    called directly (no offsets, no per-row Python conversion); the first text is checked against the
    ordinary call, and any difference falls back to it."""
    backend = _backend(tokenizer)
    if backend is not None and texts:
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
        if ids[0] == list(tokenizer(texts[:1], add_special_tokens=add_special_tokens)["input_ids"][0]):
            return ids
    return [list(x) for x in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def answer_token_ids(tokenizer, target: str, use_chat_template: bool) -> list[int]:
    ids = list(tokenizer(answer_text(target, tokenizer, use_chat_template), add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def fit(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Left-truncate the prompt so ``len(prompt) + len(answer) <= max_length`` (keeping >= 1 prompt
    token; an answer longer than that is cut at its end)."""
    if len(prompt) + len(answer) <= max_length:
        return prompt, answer, False
    keep = max(1, max_length - len(answer))
    return prompt[len(prompt) - keep:], answer[: max_length - keep], True


def assemble(prompt: list[int], answer: list[int], max_length: int) -> dict:
    prompt, answer, truncated = fit(prompt, answer, max_length)
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer, "truncated": truncated}


def encode_example(tokenizer, example: Example, max_length: int, use_chat_template: bool = True,
                   template: Optional[str] = None) -> dict:
    """``{"input_ids": [...], "labels": [...], "truncated": bool}`` for one row."""
    prompt = build_prompt(example, tokenizer, use_chat_template, template)
    return assemble(prompt_token_ids(tokenizer, [prompt], use_chat_template)[0],
                    answer_token_ids(tokenizer, example.target, use_chat_template), max_length)


class TokenizedTask(list):
    """The encoded rows of one task (a ``list`` of ``encode_example`` dicts) plus ``num_truncated``."""

    def __init__(self, name: str, features: Sequence[dict] = ()) -> None:
        super().__init__(features)
        self.name = name

    @property
    def num_truncated(self) -> int:
        return sum(1 for f in self if f["truncated"])


def tokenize_task(tokenizer, name: str, examples: Sequence[Example], max_length: int,
                  use_chat_template: bool = True, template: Optional[str] = None) -> TokenizedTask:
    """Batch-tokenised equivalent of ``[encode_example(tokenizer, ex, ...) for ex in examples]``."""
    render = PromptRenderer(tokenizer, use_chat_template, template)
    prompts = [render(ex) for ex in examples]
    prompt_ids = prompt_token_ids(tokenizer, prompts, use_chat_template) if prompts else []
    answers: dict[str, list[int]] = {}
    out = TokenizedTask(name)
    for ex, p in zip(examples, prompt_ids):
        if ex.target not in answers:
            answers[ex.target] = answer_token_ids(tokenizer, ex.target, use_chat_template)
        out.append(assemble(p, answers[ex.target], max_length))
    return out


def tokenize_tasks(tokenizer, tasks: Mapping[str, Sequence[Example]], max_length: int,
                   use_chat_template: bool = True,
                   templates: Optional[Mapping[str, Optional[str]]] = None) -> dict[str, TokenizedTask]:
    """Tokenise every task; truncated rows are counted per task and reported in the log."""
    templates = templates or {}
    out = {name: tokenize_task(tokenizer, name, exs, max_length, use_chat_template, templates.get(name))
           for name, exs in tasks.items()}
    for name, counts in truncation_counts(out).items():
        if counts:
            log.warning("task %s: %d of %d rows longer than max_length=%d were truncated from the left of the prompt",
                        name, counts, len(out[name]), max_length)
    return out


def truncation_counts(tokenized: Mapping[str, TokenizedTask]) -> dict[str, int]:
    return {name: t.num_truncated for name, t in tokenized.items()}
