"""Training checkpoints: DeepSpeed's sharded checkpoint of the adapter + optimizer, the sampler state,
the global step, the MLflow run id and each rank's RNG state.

Layout of one checkpoint directory (every rank writes its own files; Ray merges them)::

    ds/                          DeepSpeed tag "ds" (frozen base weights excluded)
    latest                       DeepSpeed's pointer file
    trainer_state.json           rank 0: global_step, sampler, mlflow_run_id, run_name, probe_plan
                                 (the diagnostics rotation), train_seconds, wall_seconds
                                 (both summed over resumes), started_at and wall_before (the
                                 invocation that wrote it and the wall seconds before it), complete=true
    rng/rank{r}.safetensors      per rank: torch CPU (and CUDA) RNG state
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

STATE = "trainer_state.json"
TAG = "ds"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupted (one line, names the path)."""


def save(engine, directory: Path, rank: int, state: dict[str, Any]) -> None:
    """All ranks: DeepSpeed shards + own RNG; rank 0 also writes the trainer state (last, atomically)."""
    engine.save_checkpoint(str(directory), tag=TAG, exclude_frozen_parameters=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    (directory / "rng").mkdir(parents=True, exist_ok=True)
    save_file(rng, str(directory / "rng" / f"rank{rank}.safetensors"))
    if rank == 0:
        tmp = directory / (STATE + ".tmp")
        tmp.write_text(json.dumps({**state, "complete": True}, indent=1))
        os.replace(tmp, directory / STATE)


def read_state(directory: Path) -> dict[str, Any]:
    f = Path(directory) / STATE
    if not f.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {STATE}: it is incomplete; delete it to start over")
    try:
        state = json.loads(f.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {f} is corrupted (invalid JSON): delete the checkpoint") from None
    if not state.get("complete") or "global_step" not in state:
        raise CheckpointError(f"checkpoint {f} is incomplete: delete the checkpoint to start over")
    if not (Path(directory) / TAG).is_dir():
        raise CheckpointError(f"checkpoint {directory} has no DeepSpeed shards ({TAG}/): it is truncated")
    return state


def load(engine, directory: Path, rank: int) -> dict[str, Any]:
    """All ranks: restore adapter, optimizer, LR schedule and RNG; returns the trainer state."""
    directory = Path(directory)
    state = read_state(directory)
    try:
        path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {directory} could not be loaded ({type(err).__name__}: "
                              f"{str(err)[:200]}): it is truncated or corrupted") from None
    if path is None:
        raise CheckpointError(f"checkpoint {directory}: DeepSpeed found no shards to load")
    rng_file = directory / "rng" / f"rank{rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def is_complete(directory: Path, world_size: Optional[int] = None) -> bool:
    """The trainer state is written and (when ``world_size`` is given) every rank's files arrived."""
    if not (directory / STATE).is_file():
        return False
    n = world_size or 0
    return all((directory / "rng" / f"rank{r}.safetensors").is_file() for r in range(n))


def latest_in(storage: Path, world_size: Optional[int] = None) -> Optional[Path]:
    """The newest complete checkpoint directory under a run's storage folder."""
    cands = sorted((p for p in Path(storage).glob("checkpoint_*") if is_complete(p, world_size)),
                   key=lambda p: read_state(p)["global_step"])
    return cands[-1] if cands else None


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"   # Ray Train's list of the run's reported checkpoints


def set_aside_broken_ray_snapshot(run_storage: Path) -> Optional[Path]:
    """Ray Train's run snapshot, if a stop cut it short, moved out of Ray's way; returns its new path.

    Ray rewrites ``checkpoint_manager_snapshot.json`` in place (truncate, then write) after every
    checkpoint, and reads it when the next run of the same name starts; a run stopped during that write
    (SIGTERM to the process group) leaves an empty or partial file, or one naming a checkpoint folder
    that is gone, and Ray's controller then dies in its constructor. rlora does not need the snapshot to
    resume (:func:`latest_in` scans the folder), so a broken one is renamed ``*.broken`` (``*.broken.1``,
    ``.2``, ... when an earlier one is there: it is never overwritten) and Ray starts without it. A
    snapshot that Ray would load is left alone (``None``): see :func:`ray_snapshot_loads`."""
    snap = Path(run_storage) / RAY_SNAPSHOT
    if not snap.is_file() or ray_snapshot_loads(snap):
        return None
    aside, n = snap.with_name(snap.name + ".broken"), 0
    while aside.exists():
        n += 1
        aside = snap.with_name(f"{snap.name}.broken.{n}")
    os.replace(snap, aside)
    return aside


def ray_snapshot_loads(snap: Path) -> bool:
    """Whether Ray Train's controller would load the snapshot file ``snap``: valid JSON that Ray's own
    model (``_CheckpointManagerState`` of ray.train.v2, where importable; else the keys it needs)
    accepts, of this Ray version, one report index per checkpoint, the latest checkpoint among the
    listed ones, and every listed checkpoint folder present next to the file."""
    try:
        data = json.loads(snap.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return False
        results = data["checkpoint_results"]
        names = [r["checkpoint_dir_name"] for r in results]
        try:
            import warnings

            import ray
            from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState
        except ImportError:  # another Ray layout: the keys Ray reads first
            ok = "ray_version" in data
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                parse = getattr(_CheckpointManagerState, "model_validate", None) or _CheckpointManagerState.parse_obj
                state = parse(data)
            latest = state.latest_checkpoint_result
            ok = (data.get("ray_version") == ray.__version__ and len(state.checkpoint_report_indices) == len(names)
                  and (latest is None or latest.checkpoint_dir_name in names))
        return bool(ok) and all((snap.parent / n).is_dir() for n in names)
    except Exception:  # noqa: BLE001 - unreadable, cut short or rejected by Ray's model: Ray would not load it
        return False
