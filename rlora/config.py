"""One typed configuration schema for everything rlora does.

A run is described by a single YAML file validated by :class:`RunConfig`.  Sections map to the
parts of the system (model, adapter, data, sampler, trainer, deepspeed, ray, mlflow, eval,
diagnostics).  Hugging Face names are used where they exist (``learning_rate``,
``per_device_train_batch_size``, ...).  Unknown keys and wrong types are errors.

Dotted CLI overrides (``trainer.max_steps=20 adapter.r=16``) are applied to the raw YAML mapping
before validation, so they are type-checked exactly like the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A user error in a config: the message is one line naming the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------
Method = Literal["lora", "hydra", "rlora", "mtl", "align"]
SINGLE_HEAD_METHODS = ("lora", "align")  # one B head: plain LoRA in the forward
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class AdapterConfig(_Section):
    """Multi-head LoRA adapter settings (shared by every method).

    ``num_heads`` is the number of B heads (N for hydra/rlora, n for mtl); ``lora`` and ``align`` ignore it.
    ``tasks`` names the tasks; task id ``i`` means ``tasks[i]``.
    """

    method: Method = "rlora"
    r: int = Field(8, description="rank of the shared down-projection A")
    alpha: float = Field(16.0, description="scaling numerator: s = alpha / r (or alpha / sqrt(r))")
    dropout: float = Field(0.05, description="dropout probability (rank space for rlora)")
    num_heads: int = Field(3, description="number of B heads (ignored by lora)")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    tasks: list[str] = Field(default_factory=list)
    temperature: float = Field(0.1, description="MTL-LoRA softmax temperature tau")
    gamma: float = Field(64.0, description="R-LoRA init scale: B, A *= d_out^(1/4) / sqrt(gamma)")
    rslora: bool = Field(False, description="scale by alpha / sqrt(r) instead of alpha / r")
    diagonal: bool = Field(False, description="MTL-LoRA: Lambda_t is diagonal (a vector)")
    zero_start_offset: bool = Field(True, description="R-LoRA: keep the offset that makes step 0 exact")
    align_lambda: float = Field(0.2, description="Align-LoRA: weight of the alignment loss (symmetric KL of "
                                                  "the tasks' Gaussian fits of A x)")
    base_model: Optional[str] = Field(None, description="recorded base model name or path")

    @field_validator("r")
    @classmethod
    def _r_pos(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"adapter.r must be a positive integer, got {v}")
        return v

    @field_validator("num_heads")
    @classmethod
    def _heads_pos(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"adapter.num_heads must be >= 1, got {v}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha_pos(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"adapter.alpha must be >= 0, got {v}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"adapter.dropout must be in [0, 1), got {v}")
        return v

    @field_validator("align_lambda")
    @classmethod
    def _lambda_nonneg(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError(f"adapter.align_lambda must be >= 0, got {v}")
        return v

    @field_validator("temperature", "gamma")
    @classmethod
    def _strictly_pos(cls, v: float, info) -> float:
        if v <= 0:
            raise ValueError(f"adapter.{info.field_name} must be > 0, got {v}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("adapter.target_modules is empty: name at least one module suffix, e.g. q_proj")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks_unique(cls, v: list[str]) -> list[str]:
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"adapter.tasks has duplicates: {dup}")
        return v

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)

    @property
    def heads(self) -> int:
        """Number of B heads actually built (1 for plain LoRA and Align-LoRA)."""
        return 1 if self.method in SINGLE_HEAD_METHODS else self.num_heads


# --------------------------------------------------------------------------------------------
# Model, data, sampler
# --------------------------------------------------------------------------------------------
class ModelConfig(_Section):
    name_or_path: str = Field("smollm2-135m", description="'smollm2-135m' (embedded), a local dir or a hub id")
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class TaskSpec(_Section):
    """One task of a run: a folder in the interchange format or a Hugging Face datasets source."""

    name: str
    path: Optional[str] = Field(None, description="task folder (train.jsonl/dev.jsonl); default data.path/name")
    hf_source: Optional[str] = Field(None, description="local parquet/json/csv file or saved dataset dir")
    columns: dict[str, str] = Field(default_factory=dict, description="map input/target/options/task to columns")
    max_examples: Optional[int] = None
    weight: Optional[float] = None
    prompt_template: Optional[str] = None


class DataConfig(_Section):
    path: Optional[str] = Field(None, description="directory in the interchange format: one folder per task")
    tasks: list[TaskSpec] = Field(default_factory=list, description="explicit task list (default: every folder)")
    max_length: int = 256
    max_train_examples_per_task: Optional[int] = None
    use_chat_template: bool = True

    @field_validator("max_length")
    @classmethod
    def _ml(cls, v: int) -> int:
        if v < 8:
            raise ValueError(f"data.max_length must be >= 8, got {v}")
        return v


Strategy = Literal["proportional", "temperature", "capped", "uniform", "round_robin", "probabilities", "dynamic"]


class SamplerConfig(_Section):
    strategy: Strategy = "proportional"
    temperature: float = Field(2.0, description="temperature strategy: p_t ~ n_t^(1/T)")
    cap: int = Field(1000, description="capped strategy: p_t ~ min(n_t, cap)")
    probabilities: Optional[dict[str, float]] = None
    batch_composition: Literal["mixed", "homogeneous"] = "mixed"
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] = "all_exhausted"
    # dynamic (DWA-style) balancing
    dynamic_tau: float = Field(1.0, description="dynamic: w_t ~ exp(r_t / tau)")
    dynamic_floor: float = Field(0.05, description="dynamic: minimum probability per task (x 1/T)")
    dynamic_interval: int = Field(10, description="dynamic: optimizer steps between re-weightings")
    dynamic_window: int = Field(10, description="dynamic: steps averaged for a loss")
    dynamic_signal: Literal["loss_ratio", "loss_ratio+conflict"] = "loss_ratio"
    dynamic_conflict_weight: float = Field(
        1.0, description="dynamic, loss_ratio+conflict: signal r_t - weight * mean gradient cosine of t to the rest"
    )

    @field_validator("temperature", "dynamic_tau")
    @classmethod
    def _pos(cls, v: float, info) -> float:
        if v <= 0:
            raise ValueError(f"sampler.{info.field_name} must be > 0, got {v}")
        return v

    @field_validator("cap", "dynamic_interval", "dynamic_window")
    @classmethod
    def _pos_int(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"sampler.{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("dynamic_floor")
    @classmethod
    def _floor(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"sampler.dynamic_floor must be in [0, 1] (a fraction of 1/T), got {v}")
        return v

    @field_validator("dynamic_conflict_weight")
    @classmethod
    def _cw(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"sampler.dynamic_conflict_weight must be >= 0, got {v}")
        return v


# --------------------------------------------------------------------------------------------
# Trainer, DeepSpeed, Ray, MLflow, eval, diagnostics
# --------------------------------------------------------------------------------------------
class TrainerConfig(_Section):
    max_steps: Optional[int] = 100
    num_train_epochs: Optional[float] = None
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 42
    bf16: bool = Field(False, description="bfloat16 autocast for the forward pass (fp32 adapter weights, "
                                          "optimizer and loss); CPU and GPU")
    output_dir: str = "outputs"
    run_name: Optional[str] = None
    logging_steps: int = 5
    save_steps: int = 50
    resume_from_checkpoint: Optional[str] = Field(
        None, description="unset/'auto': the newest checkpoint of the same run name; 'never'; or a checkpoint path")
    fail_at_step: Optional[int] = Field(None, description="fault injection: a worker dies once at this step")

    @field_validator("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size")
    @classmethod
    def _pos_int(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"trainer.{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("logging_steps", "save_steps")
    @classmethod
    def _every(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"trainer.{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("warmup_ratio")
    @classmethod
    def _warmup(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"trainer.warmup_ratio must be in [0, 1], got {v}")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"trainer.learning_rate must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _budget(self) -> "TrainerConfig":
        if self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError(
                "trainer.max_steps and trainer.num_train_epochs are both set: keep one (set the other to null)"
            )
        if self.max_steps is None and self.num_train_epochs is None:
            raise ValueError("set trainer.max_steps or trainer.num_train_epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1, got {self.max_steps}")
        return self


class DeepSpeedConfig(_Section):
    stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the generated ds_config")

    @field_validator("stage")
    @classmethod
    def _stage(cls, v: int) -> int:
        if v not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.stage must be 0, 1, 2 or 3, got {v}")
        return v

    @model_validator(mode="after")
    def _stage_supports(self) -> "DeepSpeedConfig":
        """Settings the chosen stage would drop are refused, not silently ignored."""
        extra_stage = (self.extra.get("zero_optimization") or {}).get("stage")
        if extra_stage is not None and extra_stage != self.stage:
            raise ValueError(f"deepspeed.extra.zero_optimization.stage ({extra_stage}) differs from deepspeed.stage "
                             f"({self.stage}): set the stage with deepspeed.stage only")
        if self.offload_param and self.stage != 3:
            raise ValueError(f"deepspeed.offload_param needs deepspeed.stage: 3 (got stage {self.stage}): "
                             "set stage to 3 or offload_param to false")
        if self.stage == 0:
            for name in ("offload_optimizer", "overlap_comm"):
                if getattr(self, name):
                    raise ValueError(f"deepspeed.{name} needs ZeRO (deepspeed.stage 1, 2 or 3), got stage 0: "
                                     f"raise the stage or set {name} to false")
        return self


class RayConfig(_Section):
    address: Optional[str] = Field(None, description="existing cluster ('auto', ray://...), else a local Ray")
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    storage_path: Optional[str] = Field(None, description="shared storage for checkpoints (NFS/S3/GCS)")
    max_failures: int = 0
    num_to_keep: int = 2
    dashboard_host: str = "127.0.0.1"

    @field_validator("num_workers", "num_to_keep")
    @classmethod
    def _nw(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"ray.{info.field_name} must be >= 1, got {v}")
        return v


class MlflowConfig(_Section):
    enabled: bool = True
    tracking_uri: Optional[str] = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite under output_dir")
    experiment_name: Optional[str] = Field(None, description="default: $MLFLOW_EXPERIMENT_NAME or 'rlora'")
    artifact_location: Optional[str] = None
    log_artifacts: bool = True
    log_system_metrics: bool = Field(True, description="CPU/memory/disk/GPU of rank 0's node as system/* "
                                     "metrics (every 10 s; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL)")
    parent_run_id: Optional[str] = Field(None, description="log the run as a child of this MLflow run (rlora compare)")


class EvalConfig(_Section):
    max_examples_per_task: Optional[int] = Field(100, description="dev rows scored per task; null: all; 0: no evaluation")
    every_n_steps: Optional[int] = None
    before_training: bool = True
    length_normalized: bool = False
    split: str = "dev"

    @field_validator("max_examples_per_task", "every_n_steps")
    @classmethod
    def _pos_or_none(cls, v: Optional[int], info) -> Optional[int]:
        low = 0 if info.field_name == "max_examples_per_task" else 1
        if v is not None and v < low:
            raise ValueError(f"eval.{info.field_name} must be >= {low} or null, got {v}")
        return v


class DiagnosticsConfig(_Section):
    enabled: bool = True
    every_n_steps: int = 50
    probe_batch_size: int = 2
    max_time_fraction: Optional[float] = Field(0.10, description="diagnostics time / training time the passes "
                                               "may take; a pass probes as many tasks as that allows "
                                               "(at least 8); null: every task every pass")

    @field_validator("max_time_fraction")
    @classmethod
    def _fraction(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"diagnostics.max_time_fraction must be in (0, 1] or null, got {v}")
        return v

    @field_validator("every_n_steps", "probe_batch_size")
    @classmethod
    def _pos(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"diagnostics.{info.field_name} must be >= 1, got {v}")
        return v


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)

    @model_validator(mode="after")
    def _cross(self) -> "RunConfig":
        if self.model.torch_dtype != "float32" and not self.ray.use_gpu:
            raise ValueError(f"model.torch_dtype={self.model.torch_dtype} needs a GPU on this path: use float32 on CPU")
        return self


# --------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[list[str], Any]:
    """``'trainer.max_steps=20'`` -> (['trainer', 'max_steps'], 20). Values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            child = dict(child)
            node[p] = child
            node = child
        node[parts[-1]] = value
    return raw


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see examples/configs/cpu_demo.yaml)"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


# Fields that were removed or renamed: an old config gets a one-line error naming the replacement.
REMOVED_FIELDS = {
    ("trainer", "save_total_limit"): "it is ray.num_to_keep (checkpoints kept per run)",
    ("data", "num_workers"): "rows are loaded in the training process; remove it",
}


def _check_removed(raw: dict, source: str) -> None:
    for (section, key), fix in REMOVED_FIELDS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{source}: {section}.{key} was removed: {fix}")


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    _check_removed(raw, source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply dotted overrides and validate. Errors are one-line ConfigErrors."""
    raw: dict = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}:{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, adapter, ...)")
    raw = apply_overrides(raw, overrides or [])
    cfg = validate_config(raw, source)
    if path is not None:
        _resolve_paths(cfg, Path(path).resolve().parent)
    return cfg


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    """Relative data paths are taken relative to the config file's folder when they exist there."""
    if cfg.data.path and not os.path.isabs(cfg.data.path):
        cand = (base / cfg.data.path)
        if not Path(cfg.data.path).exists() and cand.exists():
            cfg.data.path = str(cand)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


if os.environ.get("RLORA_TRACE_DIR"):  # the test suite's record of which fields runs read (rlora/_trace.py)
    from ._trace import trace_config

    trace_config(_Section, RunConfig)
