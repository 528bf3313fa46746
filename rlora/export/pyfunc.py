"""An ``mlflow.pyfunc`` model that serves an rlora adapter on top of a referenced base model.

The logged model holds the adapter directory as the artifact ``adapter`` and, in its model config,
only a *reference* to the base model (``base_model``: ``smollm2-135m``, a local folder or a hub id),
never the base weights. ``load_context`` loads the base model, injects and loads the adapter.

``predict`` takes a pandas DataFrame with columns ``task``, ``input`` and optionally ``options`` and
returns one answer string per row:

* a row with ``options`` (a list of strings, or a JSON list as text): the option with the highest
  log-likelihood given the prompt (the scoring of :func:`rlora.data.evaluate_multiple_choice`);
* a row without options (null/NaN/missing): greedy generation (at most ``max_new_tokens`` tokens).

Rows are routed to the adapter head of their ``task`` (MTL-LoRA needs a known task; an empty task
uses the model config's default ``task``). Model config keys (overridable with
``mlflow.pyfunc.load_model(uri, model_config={...})``): ``base_model``, ``task``, ``use_chat_template``
(true), ``max_length`` (256), ``max_new_tokens`` (32), ``batch_size`` (8), ``length_normalized`` (false).
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional

import mlflow.pyfunc
import pandas as pd

from .errors import ExportError

ADAPTER_ARTIFACT = "adapter"
DEFAULTS = {"task": None, "use_chat_template": True, "max_length": 256, "max_new_tokens": 32, "batch_size": 8,
            "length_normalized": False}


class PredictError(ExportError):
    """A bad prediction request (one line naming the row and the fix)."""


def _options(value: Any, row: int) -> Optional[list[str]]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise PredictError(f"row {row}: options {value[:60]!r} is text but not a JSON list: pass a list of "
                               "strings or null") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(o, str) and o for o in value):
        raise PredictError(f"row {row}: options must be a non-empty list of non-empty strings or null")
    return list(value)


class RloraAdapterModel(mlflow.pyfunc.PythonModel):
    """Base model (by reference) + rlora adapter (artifact) as a pyfunc model."""

    def load_context(self, context) -> None:
        from ..adapter_io import load_adapter
        from ..models import load_base_model, load_tokenizer

        cfg = {**DEFAULTS, **(context.model_config or {})}
        if not cfg.get("base_model"):
            raise PredictError("the model config has no base_model: pass model_config={'base_model': ...}")
        self.settings = cfg
        self.model = load_base_model(cfg["base_model"])
        load_adapter(self.model, context.artifacts[ADAPTER_ARTIFACT])
        self.model.eval()
        self.tokenizer = load_tokenizer(cfg["base_model"])
        self.adapter = self.model.rlora_config

    def _task_id(self, task: Optional[str], row: int) -> Optional[int]:
        tasks = list(self.adapter.tasks)
        if self.adapter.method == "lora" or not task:
            if self.adapter.method == "mtl":
                raise PredictError(f"row {row}: an MTL-LoRA model needs a task: one of {tasks}")
            return None
        if task not in tasks:
            if self.adapter.method == "mtl":
                raise PredictError(f"row {row}: unknown task {task!r}: the model's tasks are {tasks}")
            return None
        return tasks.index(task)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        from ..data import Example, evaluate_multiple_choice

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "input" not in df.columns:
            raise PredictError(f"the input has no 'input' column (columns: {list(df.columns)}): pass task, input "
                               "and optionally options")
        s = {**self.settings, **(params or {})}
        groups: dict[Optional[int], list[tuple[int, Example]]] = {}
        for i, rec in enumerate(df.to_dict("records")):
            task = rec.get("task")
            task = None if task is None or (isinstance(task, float) and math.isnan(task)) else str(task)
            task = task or s.get("task")
            text = rec.get("input")
            if not isinstance(text, str):
                raise PredictError(f"row {i}: input must be a string, got {type(text).__name__}")
            opts = _options(rec.get("options"), i)
            ex = Example(task=task or "", id=str(i), input=text, options=opts,
                         target=opts[0] if opts else "-")
            groups.setdefault(self._task_id(task, i), []).append((i, ex))
        answers: list[Optional[str]] = [None] * len(df)
        for tid, items in groups.items():
            res = evaluate_multiple_choice(self.model, self.tokenizer, [ex for _, ex in items],
                                           batch_size=int(s["batch_size"]), max_length=int(s["max_length"]),
                                           length_normalized=bool(s["length_normalized"]), task_id=tid,
                                           use_chat_template=bool(s["use_chat_template"]),
                                           max_new_tokens=int(s["max_new_tokens"]), return_details=True)
            for (i, _), pred in zip(items, res["predictions"]):
                answers[i] = pred
        return answers
