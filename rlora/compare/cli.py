"""``rlora compare`` (added to ``rlora.cli`` by ``extra_command``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import extra_command
from .grid import METHODS

VAL_ROWS = 100  # --val-rows when --tune is given without it
SAMPLERS = ("proportional", "temperature", "capped", "uniform", "round_robin", "dynamic")


def _names(text: str, allowed: tuple, flag: str) -> list[str]:
    from ..config import ConfigError

    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise ConfigError(f"{flag} {text!r}: use a comma-separated list of {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag} {text!r} names a value twice")
    return names


def cmd_compare(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from .suite import Suite
    from .tune import parse_tune

    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.n_boot < 100:
        raise ConfigError(f"--n-boot must be >= 100, got {args.n_boot}")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or Path(cfg.trainer.output_dir) / "compare" / Path(args.config).stem)
    methods = _names(args.methods, METHODS, "--methods")
    arms = [(m, s) for s in _names(args.samplers, SAMPLERS, "--samplers") for m in methods]
    if args.baseline not in methods:
        raise ConfigError(f"--baseline {args.baseline} is not among --methods {','.join(methods)}: add it or pick one")
    if args.tune_steps is not None and args.tune_steps < 1:
        raise ConfigError(f"--tune-steps must be >= 1, got {args.tune_steps}")
    if args.val_rows is not None and args.val_rows < 1:
        raise ConfigError(f"--val-rows must be >= 1, got {args.val_rows}")
    if (args.tune_steps is not None or args.val_rows is not None) and not args.tune:
        raise ConfigError("--tune-steps and --val-rows only apply with --tune: add --tune KEY=V1,V2 or drop them")
    val_rows = VAL_ROWS if args.val_rows is None else args.val_rows
    sets = [x.strip() for x in args.sets.split(",") if x.strip()] if args.sets is not None else None
    if sets is not None and not sets:
        raise ConfigError(f"--sets {args.sets!r}: give a comma-separated list of data set names or folders")
    Suite(cfg, arms, args.seeds, args.baseline, args.budget, out, sets=sets, tune=parse_tune(args.tune or [], cfg),
          tune_steps=args.tune_steps, val_rows=val_rows, local=args.local, n_boot=args.n_boot,
          verbose=args.verbose).run()
    return 0


@extra_command
def _add_command(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="which adapter method and sampler for your tasks: a multi-seed grid with "
                                       "paired confidence intervals")
    c.add_argument("config", help="YAML run config (e.g. examples/configs/compare_cpu.yaml)")
    c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=100")
    c.add_argument("--methods", default="lora,hydra,rlora,mtl",
                   help="comma-separated of lora, hydra, rlora, mtl, align (default the first four)")
    c.add_argument("--samplers", default="proportional", help="comma-separated, e.g. proportional,dynamic")
    c.add_argument("--seeds", type=int, default=3, help="seeds per cell: trainer.seed, +1, ... (default 3)")
    c.add_argument("--baseline", default="lora", help="the method every other is compared with (default lora)")
    c.add_argument("--budget", choices=["ab", "total"], default="ab",
                   help="equal shared A+B parameters (ab) or all trainable parameters (total) for LoRA's rank")
    c.add_argument("--out", help="results folder (default OUTPUT_DIR/compare/CONFIG_NAME); a re-run resumes it")
    c.add_argument("--local", action="store_true", help="train the cells in this process instead of on Ray")
    c.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    c.add_argument("--verbose", action="store_true", help="every cell's library and worker output here, not in its log")
    c.add_argument("--sets", help="comma-separated data sets, each reported and then pooled: folders, names in the "
                                  "folder holding data.path, or mtl_gpu12_rest (built from mtl_gpu12 less mtl_cpu6)")
    c.add_argument("--tune", action="append", metavar="KEY=V1,V2,...",
                   help="per arm, pick KEY's value on a validation split carved from the training rows (repeat for "
                        "a product), then run the seeds with the pick")
    c.add_argument("--tune-steps", type=int, help="optimizer steps of the tuning cells (default: trainer.max_steps)")
    c.add_argument("--val-rows", type=int, default=None,
                   help=f"training rows per task carved out for validation with --tune (default {VAL_ROWS})")
    c.set_defaults(fn=cmd_compare)
