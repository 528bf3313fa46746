"""Turn an :class:`Example` into prompt text; the answer is the target string itself.

With a chat template (SmolLM2 has one) the prompt is the rendered user turn plus the assistant
header, and the answer follows directly::

    <|im_start|>system ...<|im_end|>\\n<|im_start|>user\\n{body}<|im_end|>\\n<|im_start|>assistant\\n{target}<|im_end|>

Without one: ``{body}\\nAnswer:`` followed by `` {target}``. The body is the input, then the options
(one per line) when the row has at most ``MAX_LISTED_OPTIONS`` of them; tasks with a large fixed label
set (banking77: 77 intents) are shown the input only. A custom template uses ``{input}``,
``{options}`` (the listed options, or empty) and ``{task}``.
"""
from __future__ import annotations

from typing import Optional

from .errors import DataError, short
from .example import Example

MAX_LISTED_OPTIONS = 20
PLAIN_ANSWER_CUE = "\nAnswer:"


def uses_chat_template(tokenizer, use_chat_template: bool) -> bool:
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def format_options(options: list[str]) -> str:
    return "\n".join(f"- {o}" for o in options)


def prompt_body(example: Example, template: Optional[str] = None, max_listed_options: int = MAX_LISTED_OPTIONS) -> str:
    listed = example.options is not None and len(example.options) <= max_listed_options
    options = format_options(example.options) if listed else ""
    if template is None:
        return f"{example.input}\nOptions:\n{options}" if listed else example.input
    try:
        return template.format(input=example.input, options=options, task=example.task)
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise DataError(f"prompt template {short(template)} cannot be filled ({type(err).__name__}: {err}): use only "
                        "{input}, {options} and {task}, and double literal braces as {{ }}") from None


def build_prompt(example: Example, tokenizer, use_chat_template: bool = True, template: Optional[str] = None) -> str:
    """Everything the model reads before the answer (see the module docstring for the layout)."""
    body = prompt_body(example, template)
    if uses_chat_template(tokenizer, use_chat_template):
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
    return body + PLAIN_ANSWER_CUE


def answer_text(target: str, tokenizer, use_chat_template: bool = True) -> str:
    """The answer as it follows the prompt: the target, after a space in the plain layout."""
    return target if uses_chat_template(tokenizer, use_chat_template) else " " + target
