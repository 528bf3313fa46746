"""Entrypoint for `ray job submit`: `rlora export` (see `rlora export --help`).

Example:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/export.py outputs/RUN --task cosmosqa --format peft --out exports/cosmosqa-peft --data examples/data/bigbench_default
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working_dir holds the package

from rlora.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
