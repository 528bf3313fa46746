"""``AdapterModel``: an injected Hugging Face causal LM in the shape Trainer, TRL and PEFT users expect.

One object, one code path: ``forward`` takes ``task_ids`` (so Trainer's ``remove_unused_columns``
keeps a dataset's ``task_ids`` column) and delegates to the injected model; ``generate`` expands the
ids per decoded row; ``save_pretrained`` writes only the adapter (rlora's format plus a fingerprint
of the base weights), so ``Trainer.save_model`` does too; ``from_pretrained`` loads it back onto a
base model. Gradient checkpointing, however it is turned on, routes the forward's task ids into the
recompute (``rlora.context.install_checkpoint_routing``).

It subclasses ``PreTrainedModel`` only so that Trainer calls its ``save_pretrained`` (Trainer writes
a raw state dict for any other module); ``PreTrainedModel.__init__`` is not run, and attributes it
does not define are read from the wrapped model.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from ..adapter_io import FINGERPRINT_KEY, adapter_state_dict, load_adapter, save_adapter
from ..config import AdapterConfig
from ..context import current_task_ids, install_task_id_hooks, pop_task_ids, push_task_ids, uninstall_task_id_routing
from ..inject import adapter_config, bypass, count_parameters, inject, merge, unload
from ..layers import AdapterError
from .fingerprint import base_fingerprint
from .generation import generation_task_ids


def _missing_ids_error(tasks: list[str]) -> AdapterError:
    return AdapterError(
        "MTL-LoRA needs per-sample task ids and this forward got none: give each training row a `task_ids` "
        f"value (its task's index in {tasks}) and keep that column in your data collator (Trainer keeps it "
        "for an AdapterModel), or call model(..., task_ids=ids) / wrap the call in `with rlora.task_ids(ids):`")


ALIGN_WARNING = ("adapter.method=align trains as plain LoRA here: this forward's loss has no alignment term "
                 "(only rlora's training loop adds it); train with `rlora train` for Align-LoRA, or use "
                 "method=lora to say what is trained")


class AdapterModel(PreTrainedModel):
    """A causal LM with rlora adapters (every method: lora, hydra, rlora, mtl, align).

    ``model(input_ids, attention_mask, labels, task_ids=t)``: ``t`` [batch] int task ids (MTL-LoRA
    needs them; an int or one id serves the whole batch). An inner ``task_ids=`` wins over an outer
    ``with rlora.task_ids(...)``; without one, the outer ids apply.
    """

    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def __init__(self, model: nn.Module):
        nn.Module.__init__(self)  # not PreTrainedModel.__init__: the wrapped model is already set up
        if adapter_config(model) is None:
            raise AdapterError("AdapterModel wraps a model with adapters: use rlora.get_adapter_model(model, config)")
        self.model = model
        self.config = model.config
        self.name_or_path = getattr(model, "name_or_path", "")
        self._adapter_off = False  # inside disable_adapter()
        self._align_warned = False  # the align-trains-as-LoRA warning is given once per model
        if self.base_model is not model:
            # code that calls the backbone directly with the model's keywords (TRL's fused LM head) still
            # gets `task_ids=` routed
            install_task_id_hooks(self.base_model)
        if getattr(model, "generation_config", None) is not None:
            self.generation_config = model.generation_config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> nn.Module:
        """The wrapped model's backbone (``LlamaModel`` of a ``LlamaForCausalLM``), as on a ``PreTrainedModel``."""
        return getattr(self.model, "base_model", self.model)

    @property
    def adapter_config(self) -> AdapterConfig:
        return adapter_config(self.model)

    def get_base_model(self) -> nn.Module:
        """The injected Hugging Face model (its adapter layers included)."""
        return self.model

    # ---- forward / generate ----------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, task_ids=None, position_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, position_ids=position_ids,
                      inputs_embeds=inputs_embeds)
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if labels is not None and self.training and not self._align_warned and self.adapter_config.method == "align":
            self._align_warned = True
            warnings.warn(ALIGN_WARNING, UserWarning, stacklevel=2)
        if task_ids is None:
            cfg = self.adapter_config
            if cfg.method == "mtl" and current_task_ids() is None and not self._adapter_off:
                raise _missing_ids_error(cfg.tasks)
            return self.model(**inputs, **kwargs)
        push_task_ids(task_ids)
        try:
            return self.model(**inputs, **kwargs)
        finally:
            pop_task_ids()

    @torch.no_grad()
    def generate(self, *args, task_ids=None, **kwargs):
        """``model.generate(...)`` with ``task_ids`` [batch] (or an outer ``with rlora.task_ids``):
        every decoding step sees them repeated for its beams and returned sequences."""
        ids = task_ids if task_ids is not None else current_task_ids()
        cfg = self.adapter_config
        if ids is None and cfg.method == "mtl" and not self._adapter_off:
            raise _missing_ids_error(cfg.tasks)
        with generation_task_ids(self.model, ids):
            return self.model.generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.model.prepare_inputs_for_generation(*args, **kwargs)

    # ---- what Trainer and PEFT users call ----------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                   **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        self.model.activation_checkpointing_disable()

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.model.is_activation_checkpointing

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.is_activation_checkpointing

    def enable_input_require_grads(self):
        return self.model.enable_input_require_grads()

    def disable_input_require_grads(self):
        return self.model.disable_input_require_grads()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = count_parameters(self)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes exactly the base model (no task ids needed)."""
        with bypass(self.model):
            self._adapter_off = True
            try:
                yield
            finally:
                self._adapter_off = False

    def merge_and_unload(self, task: Union[str, int, None] = None) -> nn.Module:
        """Fold the adapter (of ``task`` for MTL-LoRA) into the base weights and return the plain base
        model. Exact for lora and mtl; hydra and rlora refuse (their gates depend on the input)."""
        merge(self.model, task)
        uninstall_task_id_routing(self.base_model)
        return unload(self.model)

    # ---- save / load ------------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, os.PathLike], state_dict: Optional[dict] = None,
                        is_main_process: bool = True, push_to_hub: bool = False, **kwargs) -> None:
        """Write only the adapter into ``save_directory`` (``adapter_model.safetensors`` +
        ``adapter_config.json`` with the base weights' fingerprint); other files there are kept."""
        if push_to_hub:
            raise AdapterError("save_pretrained(push_to_hub=True) is not supported: save, then upload the folder "
                               "with huggingface_hub.upload_folder")
        if not is_main_process:
            return
        state = adapter_state_dict(self.model)
        if state_dict is not None:  # Trainer's gathered copy (e.g. under DeepSpeed) is the current one
            prefix = self.base_model_prefix + "."
            state = {k: state_dict.get(prefix + k, v) for k, v in state.items()}
        save_adapter(self.model, save_directory, state=state, overwrite=True,
                     extra={FINGERPRINT_KEY: base_fingerprint(self.model)})

    @classmethod
    def from_pretrained(cls, model: Union[nn.Module, str], adapter_dir: Union[str, os.PathLike],
                        is_trainable: bool = False, **base_kwargs) -> "AdapterModel":
        """Load an adapter written by :meth:`save_pretrained` onto ``model`` (a base model, or its
        name/path for ``rlora.load_base_model``). Refuses a base whose weights differ from the one the
        adapter was trained on. ``is_trainable=False``: eval mode, adapter frozen (as in PEFT)."""
        if isinstance(model, (str, os.PathLike)):
            from .. import load_base_model

            model = load_base_model(str(model), **base_kwargs)
        load_adapter(model, adapter_dir)
        wrapped = cls(model)
        if not is_trainable:
            wrapped.eval()
            for p in wrapped.parameters():
                p.requires_grad_(False)
        return wrapped


def get_adapter_model(model: nn.Module, config: AdapterConfig) -> AdapterModel:
    """``peft.get_peft_model`` for rlora: inject ``config``'s adapter into ``model`` and wrap it."""
    return AdapterModel(inject(model, config))
