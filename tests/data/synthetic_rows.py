"""Synthetic task rows for the data tests (no real data is copied here)."""
import json
from pathlib import Path


def write_jsonl(path: Path, rows, raw_lines=()):
    """Write rows (dicts) as JSONL, then any raw lines verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(task, i, target="yes", options=("yes", "no"), text=None):
    return {"task": task, "id": f"{task}-{i}", "input": text or f"synthetic question {i} for {task}?",
            "options": list(options) if isinstance(options, (list, tuple)) else options, "target": target}
