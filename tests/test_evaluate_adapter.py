"""`rlora evaluate --adapter DIR` scores as the adapter's training run did (prompt format, chat template,
lengths from the run's recorded config), says which settings it used, and its flags override them."""
import json

import pytest

from helpers import run_config
from rlora.cli import main


@pytest.fixture(scope="module")
def trained(tiny_model_dir, task_dir, tmp_path_factory):
    from rlora.train.launcher import run_training

    out = tmp_path_factory.mktemp("eval-run")
    res = run_training(run_config(tiny_model_dir, task_dir, out, trainer__run_name="nochat", ray__num_workers=1,
                                  trainer__max_steps=4, data__use_chat_template="false", data__max_length=48,
                                  eval__max_examples_per_task=6, diagnostics__enabled="false",
                                  mlflow__log_system_metrics="false"), local=True, verbose=False)
    return res, task_dir


def _evaluate(adapter, data, out, capsys, *flags):
    assert main(["evaluate", "--data", str(data), "--adapter", str(adapter), "--out", str(out), *flags]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[rlora] scoring with")]
    return json.loads(out.read_text()), line


def test_evaluate_reproduces_the_runs_own_per_row_results(trained, tmp_path, capsys):
    res, data = trained
    after = res.summary["results_after"]
    got, [line] = _evaluate(res.adapter_dir, data, tmp_path / "m.json", capsys)
    assert "max_length 48 (run)" in line and "chat template off (run)" in line and "rows per task 6 (run)" in line
    for task, want in after.items():
        assert got[task]["row_ids"] == want["row_ids"] and len(want["row_ids"]) == 6
        assert got[task]["row_correct"] == want["row_correct"]
        assert got[task]["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_flags_override_the_runs_settings(trained, tmp_path, capsys):
    res, data = trained
    after = res.summary["results_after"]
    got, [line] = _evaluate(res.adapter_dir, data, tmp_path / "c.json", capsys, "--chat-template",
                            "--max-examples", "3")
    assert "chat template on (flag)" in line and "rows per task 3 (flag)" in line and "max_length 48 (run)" in line
    assert {r["n"] for r in got.values()} == {3}
    # the chat template wraps the prompt: the answers are scored on another context
    assert any(abs(got[t]["loss"] - after[t]["loss"]) > 1e-3 for t in got)
    off, [line] = _evaluate(res.adapter_dir, data, tmp_path / "o.json", capsys, "--no-chat-template",
                            "--max-examples", "3")
    assert "chat template off (flag)" in line
    assert all(off[t]["row_correct"] == after[t]["row_correct"][:3] for t in off)
