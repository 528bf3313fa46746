"""Entrypoint for `ray job submit`: `rlora evaluate` (see `rlora evaluate --help`).

Example:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --data examples/data/bigbench_default --adapter outputs/RUN/adapter --max-examples 50
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working_dir holds the package

from rlora.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
