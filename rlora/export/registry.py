"""``register``: log an adapter as an ``mlflow.pyfunc`` model and register it under a name and alias.

Steps (nothing is registered unless every step succeeds):

1. check the registry name and alias (one-line errors), resolve SOURCE to an adapter directory;
2. save the pyfunc model locally (adapter directory as artifact, base model by reference) and upload
   it into the **training run** that made the adapter, as the artifact ``registered/<name>/<time>``:
   the run is SOURCE when it is a run id, else the one the adapter's ``training_run.json`` names
   (when that run is in this tracking store). So the version's *Source Run* is the training run, and
   the run page lists the version. An adapter without a known training run gets a new run
   ``register-<name>`` (artifact ``model``);
3. create the registered model if needed, a new version from that artifact (``run_id`` = that run),
   and point ``alias`` at it.

A failure in step 3 deletes the version (and the registered model when this call created it) and the
uploaded files (a ``register-`` run is marked FAILED; a training run keeps its status); a process
killed before step 3 leaves uploaded files but no version.

Promotion: a registration points ``challenger`` at the new version unless another alias is named, so
it never moves ``champion`` by itself. Compare the candidate with ``models:/NAME@champion``, then move
the champion alias with ``MlflowClient().set_registered_model_alias(NAME, "champion", version)`` (or
register with ``--alias champion``).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..adapter_io import CONFIG_NAME, WEIGHTS_NAME, adapter_files
from .api import base_model_name
from .errors import ExportError
from .fold import task_index
from .source import check_adapter, resolved, run_id_of
from .staging import pause_for_tests

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9_\-]{1,255}$")
MODEL_ARTIFACT = "model"
# the model loads through the installed rlora package (not on PyPI): install rlora where it is served
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "pandas", "pydantic", "pyyaml"]


@dataclass
class Registered:
    name: str
    version: str
    alias: str
    run_id: str
    source: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ExportError(f"invalid registered model name {name!r}: use 1-256 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit (e.g. rlora-smollm2)")
    return name


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise ExportError(f"invalid alias {alias!r}: use letters, digits, '_' or '-' (e.g. champion, challenger)")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ExportError(f"alias {alias!r} is reserved by MLflow ('latest', 'v<number>'): pick another, e.g. champion")
    return alias


def _default_artifact_location(uri: str) -> Optional[str]:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("string", "task", required=False), ColSpec("string", "input"),
                     ColSpec(Array("string"), "options", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]))


def register(source, name: str, alias: str = "challenger", tracking_uri: Optional[str] = None,
             task: Optional[str] = None, base_model: Optional[str] = None, experiment: Optional[str] = None,
             artifact_location: Optional[str] = None) -> Registered:
    """Register the adapter at ``source`` as a pyfunc model version of ``name`` with ``alias``.

    ``task`` becomes the default task of rows without one. The tracking (and registry) URI is
    ``tracking_uri`` or ``$MLFLOW_TRACKING_URI``; the experiment ``experiment``, ``$MLFLOW_EXPERIMENT_NAME``
    or ``rlora``. Load the result with ``mlflow.pyfunc.load_model(f"models:/{name}@{alias}")``."""
    validate_name(name)
    validate_alias(alias)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ExportError("no MLflow tracking URI: pass --tracking-uri URI or set MLFLOW_TRACKING_URI")

    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ..tracking.mlflow_tracker import ensure_experiment
    from .pyfunc import ADAPTER_ARTIFACT

    rid = run_id_of(str(source))
    with resolved(source, uri) as adapter_dir:
        cfg = check_adapter(adapter_dir)
        if task is not None:
            task_index(cfg, task)
        base = base_model_name(cfg, base_model)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        train_run = _training_run(client, rid, adapter_dir)
        try:
            if train_run is not None:
                run, artifact = train_run, f"registered/{name}/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            else:
                exp_name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rlora"
                exp_id = ensure_experiment(uri, exp_name, artifact_location or _default_artifact_location(uri))
                tags = {"rlora.registered_model": name, "rlora.alias": alias, "method": cfg.method,
                        "base_model": base}
                run, artifact = client.create_run(exp_id, run_name=f"register-{name}", tags=tags), MODEL_ARTIFACT
        except MlflowException as err:
            raise ExportError(f"MLflow at {uri} refused to start the registration run ({_first_line(err)})") from None
        run_id = run.info.run_id
        staging = Path(tempfile.mkdtemp(prefix="rlora-pyfunc-"))
        try:
            model_dir = staging / MODEL_ARTIFACT
            packed = staging / ADAPTER_ARTIFACT                    # stored as artifacts/adapter in the model
            packed.mkdir()
            # an older folder under PEFT's file names is packed under rlora's own
            for src, dst in zip(adapter_files(adapter_dir), (CONFIG_NAME, WEIGHTS_NAME)):
                shutil.copyfile(src, packed / dst)
            model_config = {"base_model": base, "task": task, "method": cfg.method, "tasks": list(cfg.tasks)}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
                mlflow.pyfunc.save_model(str(model_dir), python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                                         artifacts={ADAPTER_ARTIFACT: str(packed)}, model_config=model_config,
                                         signature=_signature(), pip_requirements=PIP_REQUIREMENTS)
            client.log_artifacts(run_id, str(model_dir), artifact)
            pause_for_tests("uploading the model")
            # the one task it serves, else every task (chosen per row at predict time)
            served = {"task": task} if task else {"tasks": ",".join(cfg.tasks)[:500]} if cfg.tasks else {}
            version = _create_version(client, name, alias, f"{run.info.artifact_uri}/{artifact}", run_id,
                                      {"base_model": base, "method": cfg.method, "source": str(source)[:500], **served})
        except BaseException as err:
            try:
                if train_run is None:
                    client.set_terminated(run_id, "FAILED")
                else:
                    _delete_artifacts(client, run_id, artifact)
            except Exception:
                pass
            if isinstance(err, Exception) and not isinstance(err, ExportError):
                raise ExportError(f"registering {name!r} at {uri} failed ({type(err).__name__}: {_first_line(err)}); "
                                  "nothing was registered") from None
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if train_run is None:
            client.set_terminated(run_id, "FINISHED")
    return Registered(name, version, alias, run_id, str(source))


def _training_run(client, rid: Optional[str], adapter_dir: Path):
    """The MLflow run that trained the adapter, in this tracking store: SOURCE's run id, else the one in the
    adapter's ``training_run.json``; None when there is none (or it is not in this store)."""
    from mlflow.exceptions import MlflowException

    from ..tracking.run_record import read_training_record

    if rid is None:
        rid = (read_training_record(adapter_dir) or {}).get("mlflow_run_id")
    if not rid:
        return None
    try:
        return client.get_run(rid)
    except MlflowException:
        return None


def _delete_artifacts(client, run_id: str, path: str) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
    repo.delete_artifacts(path)


def _create_version(client, name: str, alias: str, source_uri: str, run_id: str, tags: dict) -> str:
    """Create (registered model if needed +) version + alias; undo what was created if a step fails."""
    from mlflow.exceptions import MlflowException

    created_model = False
    version = None
    try:
        try:
            client.get_registered_model(name)
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(name, description="rlora adapter served on a referenced base model")
            created_model = True
        mv = client.create_model_version(name, source_uri, run_id=run_id, tags=tags)
        version = mv.version
        client.set_registered_model_alias(name, alias, version)
        return str(version)
    except BaseException:
        try:
            if version is not None:
                client.delete_model_version(name, version)
            if created_model:
                client.delete_registered_model(name)
        except Exception:
            pass
        raise
