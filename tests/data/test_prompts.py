"""Prompt layout, loss masking and truncation with the real SmolLM2 tokenizer."""
import copy
import logging

import pytest

from rlora.data import DataError, Example, build_prompt, encode_example, tokenize_tasks, truncation_counts
from rlora.data.prompts import MAX_LISTED_OPTIONS
from rlora.data.tokenization import IGNORE_INDEX, prompt_token_ids

MC = Example("toy", "toy-1", "Is the sky blue on a clear day?", ["yes", "no"], "yes")
MANY = Example("intent", "intent-1", "I lost my card", [f"label_{i}" for i in range(MAX_LISTED_OPTIONS + 1)], "label_3")
FREE = Example("gen", "gen-1", "Complete: the cat sat on the", None, "mat.")


@pytest.fixture(scope="module")
def plain_tokenizer(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    return tok


def test_chat_prompt_layout(smol_tokenizer):
    p = build_prompt(MC, smol_tokenizer)
    assert p.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nIs the sky blue on a clear day?\nOptions:\n- yes\n- no<|im_end|>\n" in p
    assert p.endswith("<|im_start|>assistant\n")
    assert "Options" not in build_prompt(MANY, smol_tokenizer)          # big label sets are not listed
    assert "Options" not in build_prompt(FREE, smol_tokenizer)


def test_plain_prompt_and_template(smol_tokenizer, plain_tokenizer):
    assert build_prompt(MC, plain_tokenizer) == "Is the sky blue on a clear day?\nOptions:\n- yes\n- no\nAnswer:"
    assert build_prompt(MC, smol_tokenizer, use_chat_template=False).endswith("\nAnswer:")
    t = "Task {task}. Q: {input}\n{options}"
    assert build_prompt(MC, plain_tokenizer, template=t) == "Task toy. Q: Is the sky blue on a clear day?\n- yes\n- no\nAnswer:"
    with pytest.raises(DataError, match=r"prompt template .* cannot be filled \(KeyError: 'question'\)"):
        build_prompt(MC, plain_tokenizer, template="{question}")


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("example", [MC, MANY, FREE])
def test_labels_mask_exactly_the_prompt(smol_tokenizer, chat, example):
    enc = encode_example(smol_tokenizer, example, max_length=256, use_chat_template=chat)
    prompt = prompt_token_ids(smol_tokenizer, [build_prompt(example, smol_tokenizer, chat)], chat)[0]
    n = len(prompt)
    assert enc["input_ids"][:n] == prompt and not enc["truncated"]
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    assert enc["labels"][n:] == enc["input_ids"][n:] and IGNORE_INDEX not in enc["labels"][n:]
    answer = enc["labels"][n:]
    assert answer[-1] == smol_tokenizer.eos_token_id
    assert smol_tokenizer.decode(answer[:-1]).strip() == example.target
    assert smol_tokenizer.decode(answer, skip_special_tokens=True).strip() == example.target


def test_truncation_keeps_the_answer_and_the_prompt_end(smol_tokenizer):
    long = Example("toy", "toy-2", "word " * 300 + "final question?", ["yes", "no"], "no")
    full = encode_example(smol_tokenizer, long, max_length=10_000)
    enc = encode_example(smol_tokenizer, long, max_length=64)
    assert enc["truncated"] and len(enc["input_ids"]) == 64 and not full["truncated"]
    answer = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert smol_tokenizer.decode(answer, skip_special_tokens=True) == "no"
    assert enc["input_ids"] == full["input_ids"][-64:]                  # cut from the left of the prompt


def test_tokenize_tasks_matches_encode_example_and_counts(smol_tokenizer, caplog):
    tasks = {"short": [MC, FREE], "long": [MC, Example("long", "l-1", "x " * 200, ["a", "b"], "a"), MANY]}
    with caplog.at_level(logging.WARNING):
        out = tokenize_tasks(smol_tokenizer, tasks, max_length=96)
    for name, exs in tasks.items():
        assert list(out[name]) == [encode_example(smol_tokenizer, e, 96) for e in exs]
    assert truncation_counts(out) == {"short": 0, "long": 1} and out["long"].num_truncated == 1
    assert "task long: 1 of 3 rows longer than max_length=96 were truncated" in caplog.text
    templated = tokenize_tasks(smol_tokenizer, {"short": [MC]}, 96, templates={"short": "Q: {input}"})
    assert templated["short"][0]["input_ids"] != out["short"][0]["input_ids"]


SPACED = Example("toy", "toy-2", "  padded input with {braces} and <|im_end|>  ", ["yes", "no"], "no")


def test_prompt_renderer_equals_build_prompt_and_falls_back_for_a_template_that_edits_the_message(smol_tokenizer):
    """The chat template is rendered once per task when it places the message verbatim (SmolLM2's does);
    a template that changes the message (here: trims it) is rendered per row. Either way the prompt is
    build_prompt's."""
    from rlora.data.prompts import PromptRenderer

    fast = PromptRenderer(smol_tokenizer)
    assert fast.split is not None
    trimming = copy.deepcopy(smol_tokenizer)
    trimming.chat_template = smol_tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    assert trimming.chat_template != smol_tokenizer.chat_template
    slow = PromptRenderer(trimming)
    assert slow.split is None
    for tok, render in ((smol_tokenizer, fast), (trimming, slow)):
        for ex in (MC, MANY, FREE, SPACED):
            assert render(ex) == build_prompt(ex, tok)
    assert build_prompt(SPACED, trimming) != build_prompt(SPACED, smol_tokenizer)


def test_batch_token_ids_equal_the_tokenizer_call_and_fall_back_when_truncation_is_set(smol_tokenizer):
    from rlora.data.tokenization import _backend, batch_token_ids

    texts = [build_prompt(ex, smol_tokenizer) for ex in (MC, MANY, FREE, SPACED)]
    want = [list(x) for x in smol_tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert _backend(smol_tokenizer) is not None and batch_token_ids(smol_tokenizer, texts, False) == want
    cut = copy.deepcopy(smol_tokenizer)
    cut._tokenizer.enable_truncation(8)
    assert _backend(cut) is None  # the direct call would skip what the tokenizer call does
