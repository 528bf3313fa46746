"""Entrypoint for `ray job submit`: a multi-task fine-tune from a YAML config (+ dotted overrides).

Example (a local head started with `ray start --head --dashboard-host 127.0.0.1`):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config examples/configs/cpu_demo.yaml trainer.max_steps=20

Inside a Ray job, RAY_ADDRESS is set, so the trainer connects to that cluster instead of starting one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working_dir holds the package

from rlora.cli import main  # noqa: E402


def parse(argv: list[str]) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML run config (or env:VAR holding the YAML text)")
    p.add_argument("--debug", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=20")
    a = p.parse_args(argv)
    if a.config.startswith("env:"):  # `rlora submit` sends a config from outside the working dir this way
        import os
        import tempfile

        text = os.environ.get(a.config[4:])
        if text is None:
            sys.exit(f"error: --config {a.config}: the environment variable is not set")
        fd, a.config = tempfile.mkstemp(suffix=".yaml", prefix="rlora-config-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return (["--debug"] if a.debug else []) + ["train", a.config, *a.overrides]


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
