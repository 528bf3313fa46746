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


_PROBE_BODY = "  x {input} {{y}} {% raw %}\n\n\t<|im_end|> é ∑  "


class PromptRenderer:
    """:func:`build_prompt` for many rows of one task, with the chat template rendered once.

    The template is rendered with a marker as the user message; when that rendering splits into
    ``prefix + marker + suffix`` and the same split reproduces the real rendering of a probe body full of
    spaces, newlines, braces and special-token text, every row's prompt is ``prefix + body + suffix``
    (the template places the message verbatim). Otherwise each row is rendered by the template, as
    :func:`build_prompt` does. The result is the same string either way; only the cost differs.
    """

    MARKER = "\u0000rlora-body\u0000"

    def __init__(self, tokenizer, use_chat_template: bool = True, template: Optional[str] = None) -> None:
        self.tokenizer, self.use_chat_template, self.template = tokenizer, use_chat_template, template
        self.chat = uses_chat_template(tokenizer, use_chat_template)
        self.split: Optional[tuple[str, str]] = None
        if self.chat:
            marked = self._render(self.MARKER)
            if marked.count(self.MARKER) == 1:
                prefix, suffix = marked.split(self.MARKER)
                if prefix + _PROBE_BODY + suffix == self._render(_PROBE_BODY):
                    self.split = (prefix, suffix)

    def _render(self, body: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, example: Example) -> str:
        body = prompt_body(example, self.template)
        if not self.chat:
            return body + PLAIN_ANSWER_CUE
        if self.split is None:
            return self._render(body)
        return self.split[0] + body + self.split[1]
