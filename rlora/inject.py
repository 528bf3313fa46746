"""Inject adapter layers into any Hugging Face causal LM by module-name suffix; merge and unmerge."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

from torch import nn

from .config import AdapterConfig
from .context import install_checkpoint_routing, install_task_id_hooks, uninstall_task_id_routing
from .layers import LAYERS, AdapterError, MultiHeadLoRALinear


def _matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace every ``nn.Linear`` whose name ends with one of ``config.target_modules`` by the
    adapter layer of ``config.method``; freeze everything else. Returns the same model object."""
    if adapter_config(model) is not None:
        raise AdapterError("model already has adapters: load a fresh base model to inject again")
    if config.method == "mtl" and not config.tasks:
        raise AdapterError("adapter.method=mtl needs adapter.tasks (the task names, in task-id order)")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, mod) for name, mod in model.named_modules() if name and _matches(name, config.target_modules)]
    if not targets:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise AdapterError(f"adapter.target_modules {config.target_modules} match no module of "
                           f"{type(model).__name__}; its linear layers are named {available}")
    layer_cls = LAYERS[config.method]
    for name, mod in targets:
        if isinstance(mod, MultiHeadLoRALinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise AdapterError(f"target module '{name}' is a {type(mod).__name__}, not an nn.Linear "
                               "(GPT-2 style Conv1D layers are not supported): pick linear modules in "
                               "adapter.target_modules")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = layer_cls(mod, config, num_tasks=len(config.tasks))
        layer.train(mod.training)
        setattr(parent, child, layer)
    cfg = config.model_copy()
    if cfg.base_model is None:
        cfg.base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    model.rlora_config = cfg
    install_task_id_hooks(model)
    install_checkpoint_routing(model)
    return model


def adapter_config(model: nn.Module) -> Optional[AdapterConfig]:
    return getattr(model, "rlora_config", None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, MultiHeadLoRALinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, MultiHeadLoRALinear):
            yield name, mod


def _task_index(model: nn.Module, task: Union[str, int, None]) -> Optional[int]:
    cfg = adapter_config(model)
    if cfg is None:
        raise AdapterError("model has no adapters: call rlora.inject or rlora.load_adapter first")
    if cfg.method != "mtl":
        return None  # task is ignored where it does not apply
    if task is None:
        raise AdapterError(f"merging an MTL-LoRA adapter needs a task: one of {cfg.tasks}")
    if isinstance(task, int):
        if not 0 <= task < len(cfg.tasks):
            raise AdapterError(f"task id {task} is out of range 0..{len(cfg.tasks) - 1}")
        return task
    if task not in cfg.tasks:
        raise AdapterError(f"unknown task {task!r}: the adapter's tasks are {cfg.tasks}")
    return cfg.tasks.index(task)


def merge(model: nn.Module, task: Union[str, int, None] = None) -> nn.Module:
    """Fold the adapter (for ``task`` with MTL-LoRA) exactly into the base weights."""
    t = _task_index(model, task)
    done = []
    try:
        for _, layer in adapter_layers(model):
            layer.merge(t)
            done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the base weights exactly (W0 is kept aside while merged)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def _swap(model: nn.Module, pairs: list[tuple[str, nn.Module]]) -> None:
    for name, module in pairs:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@contextmanager
def bypass(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every adapter layer is replaced by the ``nn.Linear`` it wraps: the model
    computes exactly the base model (``h = W0 x``; no task ids needed). Restored on exit."""
    layers = list(adapter_layers(model))
    if any(layer.merged_task is not None for _, layer in layers):
        raise AdapterError("the adapter is merged into the base weights: call rlora.unmerge(model) before "
                           "disabling it")
    _swap(model, [(name, layer.base) for name, layer in layers])
    try:
        yield model
    finally:
        _swap(model, layers)


def unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its (possibly merged) ``nn.Linear`` and drop the adapter's
    config, task-id hooks and checkpoint routing: a plain Hugging Face model again."""
    if adapter_config(model) is None:
        raise AdapterError("model has no adapters to unload")
    layers = list(adapter_layers(model))
    for _, layer in layers:
        layer._w0_backup = None
    _swap(model, [(name, layer.base) for name, layer in layers])
    del model.rlora_config
    uninstall_task_id_routing(model)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
