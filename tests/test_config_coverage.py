"""Every knob of the run config is shown to work: each field of :class:`rlora.config.RunConfig` (dotted,
``data.tasks[].x`` for the fields of one task) names the test that shows its *effect* -- a changed
update, probability, prompt, checkpoint, engine setting or MLflow record -- not merely that it parses.

A new field fails here until it gets a row (and so a test); a removed field fails until its row goes;
a row fails when its test is renamed or deleted. Removed and renamed fields are not knobs: old configs
that use them get a one-line error (``rlora.config.REMOVED_FIELDS``, tests/test_bad_inputs.py).
"""
from __future__ import annotations

import ast
import typing
from functools import lru_cache
from pathlib import Path

import pytest
from pydantic import BaseModel

from rlora.config import REMOVED_FIELDS, RunConfig

REPO = Path(__file__).resolve().parents[1]

ADAPTER, DATA, SAMPLER = "tests/layers/test_layers.py", "tests/train/test_data_setup.py", "tests/sampler"
ENGINE, LOOP, LAUNCHER = "tests/train/test_engine.py", "tests/train/test_loop.py", "tests/train/test_launcher.py"
LOCAL, JSONL, TRACKER = "tests/train/test_local.py", "tests/data/test_jsonl.py", "tests/tracking/test_mlflow_tracker.py"

# field -> "tests/path.py::test_name" of the test that shows what the field does
EFFECT_TESTS: dict[str, str] = {
    # model
    "model.name_or_path": f"{LOCAL}::test_eval_before_is_the_base_model",
    "model.torch_dtype": f"{ENGINE}::test_torch_dtype_sets_the_base_model_dtype",
    "model.trust_remote_code": f"{ENGINE}::test_trust_remote_code_runs_the_model_folders_own_code",
    # adapter
    "adapter.method": "tests/test_inject.py::test_method_picks_the_layer",
    "adapter.r": f"{ADAPTER}::test_alpha_r_and_rslora_set_the_update_scale",
    "adapter.alpha": f"{ADAPTER}::test_alpha_r_and_rslora_set_the_update_scale",
    "adapter.dropout": f"{ADAPTER}::test_dropout_is_on_x_for_lora_and_rank_space_for_rlora",
    "adapter.num_heads": f"{ADAPTER}::test_num_heads_sets_the_number_of_b_heads",
    "adapter.target_modules": "tests/test_inject.py::test_injects_every_target_and_freezes_base",
    "adapter.tasks": f"{LOCAL}::test_task_list_mismatch_is_one_line_error",
    "adapter.temperature": f"{ADAPTER}::test_mtl_temperature_sets_the_head_mixing",
    "adapter.gamma": f"{ADAPTER}::test_rlora_gamma_sets_the_init_scale",
    "adapter.rslora": f"{ADAPTER}::test_alpha_r_and_rslora_set_the_update_scale",
    "adapter.diagonal": f"{ADAPTER}::test_mtl_diagonal_keeps_lambda_diagonal",
    "adapter.zero_start_offset": f"{ADAPTER}::test_zero_start_offset_cancels_the_initial_update_only_when_on",
    "adapter.base_model":
        "tests/test_adapter_io.py::test_load_into_injected_model_refuses_each_output_changing_mismatch",
    # data
    "data.path": f"{JSONL}::test_task_order_and_limits",
    "data.tasks": f"{JSONL}::test_task_order_and_limits",
    "data.tasks[].name": f"{JSONL}::test_task_path_override_and_bad_limits",
    "data.tasks[].path": f"{JSONL}::test_task_path_override_and_bad_limits",
    "data.tasks[].hf_source": "tests/data/test_hf_source.py::test_parquet_with_split_placeholder_and_mapping",
    "data.tasks[].columns": "tests/data/test_hf_source.py::test_parquet_with_split_placeholder_and_mapping",
    "data.tasks[].max_examples": f"{JSONL}::test_task_order_and_limits",
    "data.tasks[].weight": f"{DATA}::test_task_weights_reach_the_sampler",
    "data.tasks[].prompt_template": f"{DATA}::test_prompt_template_shapes_the_training_prompts",
    "data.max_length": f"{DATA}::test_max_length_truncates_the_training_rows",
    "data.max_train_examples_per_task": f"{JSONL}::test_task_order_and_limits",
    "data.use_chat_template": f"{DATA}::test_use_chat_template_switches_the_prompt_layout",
    # sampler
    "sampler.strategy": f"{SAMPLER}/test_strategies.py::test_compute_probabilities",
    "sampler.temperature": f"{SAMPLER}/test_strategies.py::test_temperature_limits_and_no_overflow",
    "sampler.cap": f"{SAMPLER}/test_strategies.py::test_compute_probabilities",
    "sampler.probabilities":
        f"{SAMPLER}/test_strategies.py::test_zero_probability_task_is_never_drawn_and_ignored_by_budget",
    "sampler.batch_composition": f"{SAMPLER}/test_distributed.py::test_homogeneous_batches_are_single_task",
    "sampler.stopping_strategy": f"{SAMPLER}/test_budget.py::test_first_exhausted",
    "sampler.dynamic_tau": f"{SAMPLER}/test_dynamic.py::test_tau_divides_the_signal",
    "sampler.dynamic_floor": f"{SAMPLER}/test_dynamic.py::test_floor_keeps_every_task_alive",
    "sampler.dynamic_interval": f"{LOCAL}::test_accumulation_schedule_and_dynamic_sampler",
    "sampler.dynamic_window": f"{SAMPLER}/test_dynamic.py::test_weight_moves_to_the_task_whose_loss_stops_falling",
    "sampler.dynamic_signal": f"{SAMPLER}/test_dynamic.py::test_conflict_signal_boosts_the_task_against_the_rest",
    "sampler.dynamic_conflict_weight": f"{SAMPLER}/test_dynamic.py::test_conflict_weight_scales_the_conflict_term",
    # trainer
    "trainer.max_steps": f"{LOCAL}::test_loss_falls_and_results",
    "trainer.num_train_epochs": f"{LOCAL}::test_epoch_budget_sets_the_step_count",
    "trainer.learning_rate": f"{ENGINE}::test_learning_rate_scales_the_first_update",
    "trainer.weight_decay": f"{ENGINE}::test_weight_decay_shrinks_the_weights",
    "trainer.warmup_ratio": f"{ENGINE}::test_the_engine_follows_the_schedule",
    "trainer.lr_scheduler_type": f"{ENGINE}::test_the_engine_follows_the_schedule",
    "trainer.per_device_train_batch_size": "tests/train/test_matrix.py::test_accumulation_equals_the_larger_batch",
    "trainer.per_device_eval_batch_size": f"{LOOP}::test_per_device_eval_batch_size_sets_the_rows_per_forward",
    "trainer.gradient_accumulation_steps": "tests/train/test_matrix.py::test_accumulation_equals_the_larger_batch",
    "trainer.max_grad_norm": f"{ENGINE}::test_max_grad_norm_clips_the_gradient",
    "trainer.gradient_checkpointing": f"{LOOP}::test_gradient_checkpointing_recomputes_the_layers",
    "trainer.seed": f"{LOCAL}::test_same_seed_same_run_other_seed_differs",
    "trainer.bf16": f"{LOOP}::test_bf16_autocasts_the_training_forward",
    "trainer.output_dir": f"{LAUNCHER}::test_output_dir_and_run_name_place_the_run",
    "trainer.run_name": f"{LAUNCHER}::test_output_dir_and_run_name_place_the_run",
    "trainer.logging_steps": f"{LOCAL}::test_progress_lines",
    "trainer.save_steps": f"{LOOP}::test_save_steps_sets_the_checkpoint_steps",
    "trainer.resume_from_checkpoint": f"{LAUNCHER}::test_resume_from_checkpoint_auto_never_and_a_path",
    "trainer.fail_at_step": "tests/train/test_trainer.py::test_worker_failure_resumes_exactly",
    # deepspeed
    "deepspeed.stage": f"{ENGINE}::test_stage_sets_the_engine_zero_stage",
    "deepspeed.offload_optimizer": f"{ENGINE}::test_offload_optimizer_offloads_the_optimizer_state",
    "deepspeed.offload_param": f"{ENGINE}::test_offload_param_offloads_zero3_parameters",
    "deepspeed.overlap_comm": f"{ENGINE}::test_overlap_comm_reaches_the_engine",
    "deepspeed.extra": f"{ENGINE}::test_extra_is_merged_into_the_ds_config_and_reaches_the_engine",
    # ray
    "ray.address": f"{LAUNCHER}::test_address_joins_an_existing_cluster_and_use_gpu_asks_it_for_gpus",
    "ray.num_workers": f"{LOOP}::test_local_equals_one_ray_worker",
    "ray.use_gpu": f"{LAUNCHER}::test_address_joins_an_existing_cluster_and_use_gpu_asks_it_for_gpus",
    "ray.resources_per_worker": f"{LOOP}::test_resources_per_worker_cpu_sets_the_torch_threads",
    "ray.storage_path": f"{LAUNCHER}::test_storage_path_holds_the_checkpoints",
    "ray.max_failures": "tests/train/test_trainer.py::test_worker_failure_resumes_exactly",
    "ray.num_to_keep": f"{LOOP}::test_num_to_keep_keeps_the_newest_checkpoints",
    "ray.dashboard_host": f"{LAUNCHER}::test_dashboard_host_is_where_the_dashboard_listens",
    # mlflow
    "mlflow.enabled": f"{LAUNCHER}::test_mlflow_enabled_records_the_run_or_writes_nothing",
    "mlflow.tracking_uri": f"{TRACKER}::test_sqlite_run_lifecycle",
    "mlflow.experiment_name": f"{TRACKER}::test_experiment_artifact_location_and_parent_come_from_the_config",
    "mlflow.artifact_location": f"{TRACKER}::test_experiment_artifact_location_and_parent_come_from_the_config",
    "mlflow.log_artifacts": f"{LAUNCHER}::test_log_artifacts_uploads_the_adapter",
    "mlflow.parent_run_id": f"{TRACKER}::test_experiment_artifact_location_and_parent_come_from_the_config",
    # eval
    "eval.max_examples_per_task": f"{LOCAL}::test_loss_falls_and_results",
    "eval.every_n_steps": f"{LOCAL}::test_accumulation_schedule_and_dynamic_sampler",
    "eval.before_training": f"{LOOP}::test_before_training_evaluates_the_untrained_adapter",
    "eval.length_normalized": f"{LOOP}::test_length_normalized_scores_options_per_token",
    "eval.split": f"{LOOP}::test_eval_split_picks_the_split",
    # diagnostics
    "diagnostics.enabled": f"{LOOP}::test_diagnostics_run_every_n_steps_unless_disabled",
    "diagnostics.every_n_steps": f"{LOOP}::test_diagnostics_run_every_n_steps_unless_disabled",
    "diagnostics.probe_batch_size": f"{LOOP}::test_probe_batch_size_sets_the_probe_rows_per_task",
}


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside a type annotation (``list[TaskSpec]``, ``Optional[X]``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def schema_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every knob as a dotted name. A section (a field that is a model) is not a knob itself, its fields
    are; a collection of models (``data.tasks``) is a knob, and so is each field of an item (``data.tasks[].x``)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += schema_fields(ann, f"{prefix}{name}.")
            continue
        out.append(prefix + name)
        for item in _models_in(ann):
            out += schema_fields(item, f"{prefix}{name}[].")
    return out


@lru_cache(maxsize=None)
def defined_tests(path: str) -> frozenset[str]:
    """``test_x`` and ``TestClass::test_x`` defined in a test file (parsed, not imported)."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"), filename=path)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{n.name}" for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return frozenset(n for n in names if n.rsplit("::", 1)[-1].startswith("test"))


def test_the_schema_walk_sees_sections_and_task_fields():
    fields = schema_fields()
    assert "trainer.learning_rate" in fields and "data.tasks" in fields and "data.tasks[].weight" in fields
    assert "trainer" not in fields and len(fields) == len(set(fields))


def test_every_field_has_an_effect_test():
    missing = [f for f in schema_fields() if f not in EFFECT_TESTS]
    assert not missing, (f"config fields without an effect test: {missing}: add a row to EFFECT_TESTS naming "
                         "the test that shows what each one changes")


def test_the_table_names_only_existing_fields():
    gone = sorted(set(EFFECT_TESTS) - set(schema_fields()))
    assert not gone, f"EFFECT_TESTS names fields that are not in RunConfig any more: {gone}: remove their rows"
    removed = sorted(f"{s}.{k}" for s, k in REMOVED_FIELDS if f"{s}.{k}" in EFFECT_TESTS)
    assert not removed, f"removed fields are listed as knobs: {removed}"


@pytest.mark.parametrize("field", sorted(EFFECT_TESTS))
def test_the_effect_test_exists(field):
    ref = EFFECT_TESTS[field]
    path, sep, name = ref.partition("::")
    assert sep and name, f"{field}: {ref!r} is not of the form tests/path.py::test_name"
    assert path.startswith("tests/") and path.endswith(".py") and (REPO / path).is_file(), \
        f"{field}: {path} does not exist"
    assert name in defined_tests(path), f"{field}: {path} defines no test {name}"
