"""``rlora export`` and ``rlora register`` sub-commands (added to ``rlora.cli`` by ``extra_command``)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..cli import extra_command


def library_log(command: str) -> Path:
    """Where a command's library output (transformers' "Loading weights" and MLflow's "Downloading
    artifacts" progress bars, warnings) goes: ``$RLORA_CACHE/logs/<command>-<time>-<pid>.log``."""
    from ..models import cache_root

    return cache_root() / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from .. import console
    from .api import REPORT_NAME, export

    log = library_log("export")
    with console.run_log(log):
        out = export(args.source, task=args.task, format=args.format, out=args.out, data=args.data,
                     base_model=args.base_model, tracking_uri=args.tracking_uri, max_examples=args.max_examples,
                     max_length=args.max_length, overwrite=args.overwrite)
    report = json.loads((out / REPORT_NAME).read_text())
    err, err16 = report.get("relative_logit_error"), report.get("relative_logit_error_bf16")
    what = "exact" if report.get("exact") else "average-gate fold"
    extra = ""
    if err is not None:
        extra = f", relative logit error {err:.3g} (fp32)"
        extra += f" / {err16:.3g} (bf16, as served)" if err16 is not None else ""
        extra += f" on {report.get('dev_examples')} dev rows"
    rank = f", rank {report['rank']}" if report.get("rank") else ""
    print(f"[rlora] {args.format} export of {report['method']} ({what}{rank}{extra}) -> {out}")
    serving = report.get("serving") or {}
    for line in serving.get("findings", []):
        print(f"[rlora] warning: {line}")
    if serving.get("vllm"):
        print(f"[rlora] serve with vLLM:   {serving['vllm']}")
        print(f"[rlora] serve with SGLang: {serving['sglang']}")
    if serving.get("base_model_note"):
        print(f"[rlora] base model: {serving['base_model_note']}")
    print(f"[rlora] library output: {log}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from .. import console
    from .registry import register

    log = library_log("register")
    with console.run_log(log):
        reg = register(args.source, name=args.name, alias=args.alias, tracking_uri=args.tracking_uri, task=args.task,
                       base_model=args.base_model, experiment=args.experiment)
    print(f"[rlora] registered {reg.name} version {reg.version} as @{reg.alias} (run {reg.run_id}); load with "
          f"mlflow.pyfunc.load_model('{reg.model_uri}')")
    return 0


@extra_command
def _add_commands(sub: argparse._SubParsersAction) -> None:
    src_help = "adapter dir, checkpoint/training output dir holding adapter/, or an MLflow run id"
    e = sub.add_parser("export", help="export an adapter as a PEFT adapter, a merged HF model, or the full adapter")
    e.add_argument("source", help=src_help)
    e.add_argument("--task", help="the task to export (required for mtl, hydra, rlora; ignored for lora and align)")
    e.add_argument("--format", choices=["peft", "merged", "multihead"], default="peft")
    e.add_argument("--out", required=True, help="output directory (written atomically)")
    e.add_argument("--data", help="data directory (one folder per task): dev rows measure the gates and the error")
    e.add_argument("--base-model", help="base model name or path (default: the adapter config's base_model)")
    e.add_argument("--tracking-uri", help="MLflow tracking URI when SOURCE is a run id (default $MLFLOW_TRACKING_URI)")
    e.add_argument("--max-examples", type=int, default=32, help="dev rows used to measure (default 32)")
    e.add_argument("--max-length", type=int, default=256, help="token limit per dev row (default 256)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    e.set_defaults(fn=cmd_export)

    r = sub.add_parser("register", help="register an adapter in the MLflow model registry as a pyfunc model")
    r.add_argument("source", help=src_help)
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument("--alias", default="challenger",
                   help="alias to point at the new version (default challenger; champion moves only when named)")
    r.add_argument("--task", help="default task for rows that name none")
    r.add_argument("--base-model", help="base model reference (default: the adapter config's base_model)")
    r.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI)")
    r.add_argument("--experiment", help="experiment of the registration run (default $MLFLOW_EXPERIMENT_NAME or rlora)")
    r.set_defaults(fn=cmd_register)
