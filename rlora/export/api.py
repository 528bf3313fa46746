"""``export``: turn a trained adapter into a PEFT adapter, a merged Hugging Face model, or a copy of
the full multi-head adapter -- written atomically, with a report of how exact the export is."""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Union

import torch

from ..adapter_io import CONFIG_NAME, WEIGHTS_NAME, adapter_files, load_adapter
from ..config import AdapterConfig
from .errors import ExportError
from .fold import (EXACT_METHODS, ROUTED_METHODS, apply_weights, compact_all, fold_adapter, folded_weights,
                   iter_layer_gates, load_dev_examples, reference_pass, relative_errors, served_model, task_index,
                   token_batches)
from .merged import write_merged
from .peft_format import write_peft
from .source import check_adapter, resolved, run_id_of
from .staging import StagedDir

FORMATS = ("peft", "merged", "multihead")
REPORT_NAME = "export_report.json"
PathLike = Union[str, os.PathLike]


def base_model_name(cfg: AdapterConfig, override: Optional[str] = None) -> str:
    """The base model an adapter belongs to: ``override``, else the config's ``base_model``. The cached
    embedded model's folder is written as its portable name ``smollm2-135m``."""
    from ..models import DEFAULT_MODEL, default_model_dir

    name = override or cfg.base_model
    if not name:
        raise ExportError("the adapter config records no base_model: pass --base-model NAME_OR_PATH")
    try:
        if Path(name).expanduser().resolve() == default_model_dir().resolve():
            return DEFAULT_MODEL
    except OSError:
        pass
    return name


def serving_report(folder: Path, final: Path, format: str, record: dict, name: str, rank: int) -> dict:
    """The engines' view of the files in ``folder`` (to be renamed to ``final``): the commands that serve it
    and one line for each thing vLLM or SGLang would reject or compute differently."""
    from .serving_rules import check_merged_dir, check_peft_dir, serving_commands

    base = record["serve_as"]
    if format == "peft":
        base_cfg = Path(base) / "config.json"
        findings = check_peft_dir(folder, json.loads(base_cfg.read_text()) if base_cfg.is_file() else None)
        commands = serving_commands(base, {name: str(final)}, rank)
    else:
        findings = check_merged_dir(folder)
        commands = {"vllm": f"vllm serve {final}",
                    "sglang": f"python -m sglang.launch_server --model-path {final}"}
    return {**commands, "findings": [f.line(final) for f in findings], "base_model_note": record.get("note")}


def _write_report(folder: Path, report: dict, staging: StagedDir) -> None:
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    staging.wrote(REPORT_NAME)


def _log_to_run(run_id: str, tracking_uri: Optional[str], report: dict) -> None:
    from .source import tracking_uri_for
    from mlflow.tracking import MlflowClient

    uri = tracking_uri_for(tracking_uri)
    tag = f"{report['task'] or 'all'}-{report['format']}"
    try:
        c = MlflowClient(tracking_uri=uri)
        if report.get("relative_logit_error") is not None:
            c.log_metric(run_id, f"export/{report['task'] or 'all'}/relative_logit_error",
                         float(report["relative_logit_error"]))
        c.log_dict(run_id, report, f"exports/{tag}/{REPORT_NAME}")
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ExportError(f"could not log the export report to MLflow run {run_id} at {uri} ({first}): check the "
                          "tracking server") from None


def _export_multihead(adapter_dir: Path, cfg: AdapterConfig, staging: StagedDir, report: dict,
                      base_override: Optional[str]) -> None:
    src_config, src_weights = adapter_files(adapter_dir)          # rlora's names, or the legacy PEFT ones
    with staging as tmp:
        shutil.copyfile(src_weights, tmp / WEIGHTS_NAME)
        staging.wrote(WEIGHTS_NAME)
        meta = json.loads(src_config.read_text())
        if base_override:
            meta["base_model"] = base_override
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        staging.wrote(CONFIG_NAME)
        _write_report(tmp, report, staging)


def export(source: PathLike, task: Optional[str] = None, format: str = "peft", out: Optional[PathLike] = None,
           data: Optional[PathLike] = None, base_model: Optional[str] = None, tracking_uri: Optional[str] = None,
           max_examples: int = 32, max_length: int = 256, batch_size: int = 4, overwrite: bool = False,
           use_chat_template: bool = True) -> Path:
    """Export the adapter at ``source`` (see :func:`resolve_source`) for ``task`` into ``out``.

    * ``peft``: a PEFT LoRA adapter directory for one task (exact for lora/mtl; average-gate fold for
      hydra/rlora, which needs ``data``: the interchange-format data directory whose ``<task>/dev.jsonl``
      rows are used to measure the gates -- at most ``max_examples`` rows);
    * ``merged``: a Hugging Face model directory with the task's update folded into the base weights;
    * ``multihead``: the full adapter (every task), reloadable with :func:`rlora.load_adapter`.

    ``export_report.json`` in ``out`` records the method, task, rank and -- when dev rows were used --
    the measured relative logit error of the export against the adapter model (also logged to the run
    when ``source`` is an MLflow run id). Returns ``out``.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown --format {format!r}: use one of {', '.join(FORMATS)}")
    if out is None:
        raise ExportError("no output directory: pass --out DIR")
    staging = StagedDir(Path(out), overwrite=overwrite)
    staging.check_target()
    rid = run_id_of(str(source))
    with resolved(source, tracking_uri) as adapter_dir:
        cfg = check_adapter(adapter_dir)
        if format == "multihead" and task is not None and cfg.tasks and task not in cfg.tasks:
            raise ExportError(f"unknown task {task!r}: the adapter's tasks are {cfg.tasks}")
        tid = task_index(cfg, task) if format != "multihead" else None
        report = {"format": format, "method": cfg.method, "task": task,
                  "source": str(source), "mlflow_run_id": rid, "adapter_tasks": list(cfg.tasks),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if format == "multihead":
            report.update(base_model=base_model or cfg.base_model, exact=True, relative_logit_error=0.0,
                          serving={"findings": [f"{e} cannot load an rlora multi-head adapter: export one task with "
                                                "--format peft" for e in ("vLLM", "SGLang")]})
            _export_multihead(adapter_dir, cfg, staging, report, base_model)
            return staging.out
        base = base_model_name(cfg, base_model)
        examples = _dev_examples(cfg, data, task, max_examples)
        folds, plain, tokenizer, record = _fold_and_measure(adapter_dir, cfg, base, format, tid, examples, report,
                                                            max_length, batch_size, use_chat_template)
        if rid is not None:
            _log_to_run(rid, tracking_uri, report)
        with staging as tmp:
            if format == "peft":
                write_peft(tmp, cfg, folds, record["serve_as"], on_file=staging.wrote, revision=record["revision"])
            else:
                write_merged(tmp, plain, tokenizer, on_file=staging.wrote)
            report["serving"] = serving_report(tmp, staging.out, format, record, task or "adapter", report["rank"])
            _write_report(tmp, report, staging)
    return staging.out


def _dev_examples(cfg: AdapterConfig, data: Optional[PathLike], task: Optional[str], max_examples: int) -> list:
    """The task's dev rows that measure the export (a routed adapter's average gates need them)."""
    if cfg.method in ROUTED_METHODS and data is None:
        raise ExportError(f"a {cfg.method} adapter routes tokens per input, so its export uses the task's average "
                          "gates measured on dev rows: pass --data DIR (the run's data directory)")
    examples = load_dev_examples(Path(data), task, max_examples) if data is not None and task else []
    if data is not None and not task:
        raise ExportError("--data needs --task: the dev rows of that task are used to measure the export")
    return examples


def _fold_and_measure(adapter_dir: Path, cfg: AdapterConfig, base: str, format: str, tid: Optional[int],
                      examples: list, report: dict, max_length: int, batch_size: int, use_chat_template: bool):
    """Fold the task's update into LoRA factors (and the merged weights where needed) and measure the export
    against the adapter model on ``examples``; fills ``report``. Returns (folds, merged model or None,
    tokenizer or None, the base model's record)."""
    from ..models import load_base_model, load_tokenizer
    from .base_record import describe_base

    routed = cfg.method in ROUTED_METHODS
    model = load_base_model(base)
    record = describe_base(base, model)
    load_adapter(model, adapter_dir)
    model.eval()
    tokenizer = load_tokenizer(base) if (examples or format == "merged") else None
    batches = token_batches(tokenizer, examples, max_length, batch_size, use_chat_template) if examples else []
    reference = reference_pass(model, batches, tid) if batches else None
    gates, tokens = (reference.gates, reference.tokens) if reference is not None else ({}, 0)
    folds = fold_adapter(model, tid, gates if routed else None)
    block_rank = next(iter(folds.values())).rank if folds else 0
    if format == "peft" and folds and block_rank > cfg.r:
        folds = compact_all(folds)          # R-LoRA's [Σḡ B, −B̄⁰][A; A⁰] -> the net update's own factors
    rank = next(iter(folds.values())).rank if folds else 0
    report.update(base_model=record["serve_as"], base_model_record=record, rank=rank, block_rank=block_rank,
                  scaling=cfg.scaling, exact=cfg.method in EXACT_METHODS, dev_examples=len(examples),
                  dev_tokens=tokens, relative_logit_error=None, relative_logit_error_bf16=None)
    if routed:
        report["average_gates"] = dict(iter_layer_gates(gates))
    plain = None
    if format == "merged" or batches:
        weights = folded_weights(model, cfg.method, tid, folds)
        plain = apply_weights(load_base_model(base), weights)
        del weights
    if batches:
        # fp32: the fold itself; bf16: the export as an engine runs it (PEFT: an unmerged LoRA, merged: the
        # merged weights), both against the adapter model in fp32
        served = (served_model(load_base_model(base), folds, torch.bfloat16) if format == "peft"
                  else copy.deepcopy(plain).to(torch.bfloat16))
        report.update(relative_errors(model, {"relative_logit_error": plain, "relative_logit_error_bf16": served},
                                      batches, tid, reference))
        del served
    del model
    for key in ("relative_logit_error", "relative_logit_error_bf16"):
        if not torch.isfinite(torch.tensor(report[key] or 0.0)):
            raise ExportError("the measured relative logit error is not finite: the adapter weights hold NaN/inf")
    return folds, plain, tokenizer, record
