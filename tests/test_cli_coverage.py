"""Every flag of the ``rlora`` command line names the test that shows its *effect* (the same rule as
tests/test_config_coverage.py for config fields). A new flag fails here until it gets a row; a row fails
when its test is renamed or deleted. ``KNOWN_GAPS`` lists the flags whose effect no test shows yet, with
why: it may only shrink (a gap that gets a test must move to ``EFFECT_TESTS``)."""
from __future__ import annotations

import argparse

import pytest

from test_config_coverage import REPO, defined_tests

EXPORT, REGISTRY, JOBS = "tests/export/test_export.py", "tests/export/test_registry.py", "tests/test_jobs.py"
VERB, CLI, SUBMIT = "tests/compare/test_verb.py", "tests/test_cli.py", "tests/test_submit.py"

# "command flag" -> "tests/path.py::test_name"
EFFECT_TESTS: dict[str, str] = {
    "--debug": "tests/test_bad_inputs.py::test_debug_flag_shows_traceback",
    "train config": "tests/test_main_job_console.py::test_console_shows_each_line_once_and_no_noise",
    "train overrides": "tests/test_main_job_console.py::test_console_shows_each_line_once_and_no_noise",
    "train --local": "tests/train/test_loop.py::test_local_equals_one_ray_worker",
    "train --verbose": "tests/train/test_launcher.py::test_verbose_shows_library_output_on_the_console_instead_of_the_log",
    "evaluate --data": f"{CLI}::test_split_and_max_examples_choose_the_rows",
    "evaluate --adapter": f"{JOBS}::test_evaluate_job_runs_with_an_adapter",
    "evaluate --base-model": f"{JOBS}::test_evaluate_base_model",
    "evaluate --split": f"{CLI}::test_split_and_max_examples_choose_the_rows",
    "evaluate --max-examples": f"{CLI}::test_split_and_max_examples_choose_the_rows",
    "evaluate --max-length": f"{CLI}::test_scoring_flags_reach_the_scorer",
    "evaluate --length-normalized": f"{CLI}::test_scoring_flags_reach_the_scorer",
    "evaluate --out": f"{CLI}::test_split_and_max_examples_choose_the_rows",
    "evaluate --batch-size": f"{CLI}::test_batch_size_sets_rows_per_forward_and_leaves_results_alone",
    "prepare-model --force": "tests/test_models.py::test_prepare_model_converting_afresh_prints_no_warning_and_force_rebuilds",
    "submit config": f"{SUBMIT}::test_submit_wait_succeeds_and_records_adapter_and_mlflow",
    "submit overrides": f"{SUBMIT}::test_submit_wait_succeeds_and_records_adapter_and_mlflow",
    "submit --address": f"{SUBMIT}::test_submit_wait_succeeds_and_records_adapter_and_mlflow",
    "submit --wait": f"{SUBMIT}::test_submit_wait_succeeds_and_records_adapter_and_mlflow",
    "submit --pip": f"{SUBMIT}::test_pip_takes_one_requirement_per_flag_and_leaves_overrides_alone",
    "submit --no-wait": f"{SUBMIT}::test_no_wait_returns_while_the_job_still_runs_with_its_entrypoint_cpus",
    "submit --entrypoint-num-cpus": f"{SUBMIT}::test_no_wait_returns_while_the_job_still_runs_with_its_entrypoint_cpus",
    "export source": f"{EXPORT}::test_sources_training_output_and_ray_checkpoints",
    "export --task": f"{EXPORT}::test_cli_unknown_task_lists_the_tasks",
    "export --format": f"{JOBS}::test_export_job_runs",
    "export --out": f"{EXPORT}::test_cli_export_prints_summary",
    "export --data": f"{EXPORT}::test_routed_export_reports_measured_error",
    "export --tracking-uri": "tests/export/test_registry.py::test_export_from_run_id_logs_the_report",
    "export --max-examples": f"{EXPORT}::test_routed_export_reports_measured_error",
    "export --overwrite": f"{EXPORT}::test_export_refuses_non_empty_out_and_overwrites_on_request",
    "export --base-model": f"{EXPORT}::test_cli_base_model_overrides_the_recorded_one",
    "export --max-length": f"{EXPORT}::test_cli_max_length_truncates_the_rows_that_measure_the_gates",
    "register --task": f"{REGISTRY}::test_cli_task_and_base_model_are_recorded_on_the_version",
    "register --base-model": f"{REGISTRY}::test_cli_task_and_base_model_are_recorded_on_the_version",
    "register source": f"{REGISTRY}::test_register_from_run_id_and_unknown_task",
    "register --name": f"{JOBS}::test_register_job_runs",
    "register --alias": f"{REGISTRY}::test_promotion_moves_the_champion_alias",
    "register --tracking-uri": f"{JOBS}::test_register_job_runs",
    "register --experiment": f"{REGISTRY}::test_register_from_run_id_and_unknown_task",
    "compare config": f"{VERB}::test_ray_cells_are_paired_and_logged_as_mlflow_children",
    "compare overrides": "tests/compare/test_cli.py::test_bad_flags_are_one_line_errors",
    "compare --methods": f"{VERB}::test_cells_resume_after_the_process_is_killed",
    "compare --seeds": f"{VERB}::test_cells_resume_after_the_process_is_killed",
    "compare --out": f"{VERB}::test_cells_resume_after_the_process_is_killed",
    "compare --local": f"{VERB}::test_cells_resume_after_the_process_is_killed",
    "compare --n-boot": "tests/compare/test_bootstrap.py::test_counts_match_index_resampling_in_distribution",
    "compare --budget": "tests/compare/test_budget.py::test_total_gives_lora_at_least_every_method_s_trainable_parameters",
    "compare --verbose": f"{VERB}::test_ray_compare_console_shows_only_rlora_lines",
    "compare --samplers": f"{VERB}::test_samplers_and_baseline_choose_the_arms_and_the_comparisons",
    "compare --baseline": f"{VERB}::test_samplers_and_baseline_choose_the_arms_and_the_comparisons",
}

KNOWN_GAPS: dict[str, str] = {}  # none left; a new flag comes with its effect test


# the gaps when this table was written: KNOWN_GAPS may lose entries, never gain one
GAPS_AT_WRITING = frozenset({
    "evaluate --batch-size", "train --verbose", "submit --no-wait", "submit --entrypoint-num-cpus",
    "export --base-model", "export --max-length", "register --task", "register --base-model", "compare --samplers",
    "compare --baseline"})


def cli_flags() -> list[str]:
    """``"command flag"`` for every option and positional of ``rlora`` and its sub-commands."""
    from rlora.cli import _load_extra_commands, build_parser

    _load_extra_commands()
    out: list[str] = []

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, name)
            elif not isinstance(a, argparse._HelpAction):
                name = max(a.option_strings, key=len) if a.option_strings else a.dest
                out.append(f"{prefix} {name}".strip())

    walk(build_parser(), "")
    return out


def test_the_walk_sees_every_command():
    flags = cli_flags()
    assert {"train --local", "compare --budget", "export --format", "submit --pip", "--debug"} <= set(flags)


def test_every_flag_has_an_effect_test_or_a_stated_gap():
    missing = [f for f in cli_flags() if f not in EFFECT_TESTS and f not in KNOWN_GAPS]
    assert not missing, f"flags without an effect test: {missing}: add a row to EFFECT_TESTS"


def test_known_gaps_only_shrink():
    new = set(KNOWN_GAPS) - GAPS_AT_WRITING
    assert not new, f"new flags without an effect test: {sorted(new)}: write the test instead of a gap"


def test_the_tables_name_only_existing_flags_and_do_not_overlap():
    flags = set(cli_flags())
    assert not (set(EFFECT_TESTS) | set(KNOWN_GAPS)) - flags
    assert not set(EFFECT_TESTS) & set(KNOWN_GAPS)


@pytest.mark.parametrize("flag", sorted(EFFECT_TESTS))
def test_the_effect_test_exists(flag):
    path, _, name = EFFECT_TESTS[flag].partition("::")
    assert (REPO / path).is_file() and name in defined_tests(path), f"{flag}: {EFFECT_TESTS[flag]} does not exist"
