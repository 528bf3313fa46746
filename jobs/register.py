"""Entrypoint for `ray job submit`: `rlora register` (see `rlora register --help`).

Example:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/register.py outputs/RUN --name rlora-demo --alias challenger --tracking-uri http://mlflow.internal:5000
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working_dir holds the package

from rlora.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["register", *sys.argv[1:]]))
