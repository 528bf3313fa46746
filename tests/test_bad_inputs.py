"""The bad-input catalogue: each case gives one clear line naming what and where, a non-zero exit,
no traceback, and fails before any Ray worker starts (Ray is not even initialised) and before any
MLflow run or checkpoint is written."""
import json
from pathlib import Path

import pytest
import yaml

from helpers import write_tasks
from rlora.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("bad-data"))


def base_cfg(model_dir, data_dir, out):
    return {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"method": "rlora", "r": 4, "num_heads": 2, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(data_dir), "max_length": 64},
        "trainer": {"max_steps": 2, "output_dir": str(out)},
        "ray": {"num_workers": 1},
        "eval": {"max_examples_per_task": 2},
    }


def assert_names(err: str, expected, tmp_path: Path) -> None:
    """Every expected fragment is in the message; the test's temporary path (which holds the test's
    name) is masked first so that it cannot supply a match."""
    msg = err.replace(str(tmp_path), "<tmp>")
    for fragment in (expected,) if isinstance(expected, str) else expected:
        assert fragment in msg, msg


def run_cli(capsys, argv):
    import ray

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert not ray.is_initialized(), "a bad input must fail before Ray starts"
    return code, err


def corrupt(data_dir: Path, tmp: Path, how: str) -> Path:
    """A copy of the synthetic task folders with one defect."""
    import shutil

    d = tmp / "data"
    shutil.copytree(data_dir, d)
    f = d / "parity" / "train.jsonl"
    lines = f.read_text().splitlines()
    row = json.loads(lines[1])
    if how == "malformed":
        lines[1] = lines[1][:-5]
    elif how == "missing_field":
        row.pop("target"); lines[1] = json.dumps(row)
    elif how == "target_not_option":
        row["target"] = "maybe"; lines[1] = json.dumps(row)
    elif how == "labels_missing":
        row["options"] = "labels.json"; lines[1] = json.dumps(row)
    elif how == "empty":
        lines = []
    elif how == "duplicate_id":
        lines[2] = lines[1]
    elif how == "non_utf8":
        f.write_bytes("\n".join(lines).encode() + b"\n{\"task\": \"parity\", \"id\": \"x\xff\"}\n")
        return d
    f.write_text("\n".join(lines) + ("\n" if lines else ""))
    return d


CONFIG_CASES = [
    # (id, overrides, expected message fragment(s): each names the field, the value or the file)
    ("unknown_key", ["trainer.max_stepz=3"], "trainer.max_stepz: unknown key"),
    ("wrong_type", ["trainer.max_steps=ten"], "trainer.max_steps: Input should be a valid integer"),
    ("rank_zero", ["adapter.r=0"], "adapter.r must be a positive integer, got 0"),
    ("heads_zero", ["adapter.num_heads=0"], "adapter.num_heads must be >= 1, got 0"),
    ("negative_alpha", ["adapter.alpha=-2"], "adapter.alpha must be >= 0, got -2"),
    ("unknown_method", ["adapter.method=dora"], "adapter.method: Input should be 'lora', 'hydra', 'rlora', 'mtl' or 'align'"),
    ("dropout_range", ["adapter.dropout=1.5"], "adapter.dropout must be in [0, 1)"),
    ("negative_align_lambda", ["adapter.align_lambda=-0.5"], "adapter.align_lambda must be >= 0, got -0.5"),
    ("targets_match_nothing", ["adapter.target_modules=[c_attn]"],
     "adapter.target_modules ['c_attn'] match no module of LlamaForCausalLM"),
    ("targets_empty", ["adapter.target_modules=[]"], "adapter.target_modules is empty"),
    ("zero_stage", ["deepspeed.stage=4"], "deepspeed.stage must be 0, 1, 2 or 3, got 4"),
    ("offload_param_below_zero3", ["deepspeed.stage=2", "deepspeed.offload_param=true"],
     "deepspeed.offload_param needs deepspeed.stage: 3 (got stage 2)"),
    ("offload_optimizer_without_zero", ["deepspeed.stage=0", "deepspeed.offload_optimizer=true"],
     "deepspeed.offload_optimizer needs ZeRO (deepspeed.stage 1, 2 or 3), got stage 0"),
    ("overlap_comm_without_zero", ["deepspeed.stage=0", "deepspeed.overlap_comm=true"],
     "deepspeed.overlap_comm needs ZeRO"),
    ("stage_in_extra", ["deepspeed.extra={zero_optimization: {stage: 3}}"],
     "deepspeed.extra.zero_optimization.stage (3) differs from deepspeed.stage (2)"),
    ("no_workers", ["ray.num_workers=0"], "ray.num_workers must be >= 1, got 0"),
    ("removed_field", ["trainer.save_total_limit=3"], "trainer.save_total_limit was removed: it is ray.num_to_keep"),
    ("weight_round_robin", ["sampler.strategy=round_robin", "data.tasks=[{name: parity, weight: 2}, {name: sign}]"],
     "data.tasks[].weight does not combine with sampler.strategy=round_robin"),
    ("missing_data_path", ["data.path=/nonexistent/tasks"], "data.path /nonexistent/tasks does not exist"),
    ("no_data_path", ["data.path=null"], "data.path is not set"),
    ("weights_unknown_task", ["sampler.strategy=probabilities", "sampler.probabilities={parity: 0.5, poetry: 0.5}"],
     "sampler.probabilities names unknown task(s) ['poetry']"),
    ("sampler_temperature", ["sampler.strategy=temperature", "sampler.temperature=0"],
     "sampler.temperature must be > 0, got 0"),
    ("mtl_temperature", ["adapter.method=mtl", "adapter.temperature=-1"], "adapter.temperature must be > 0"),
    ("steps_and_epochs", ["trainer.num_train_epochs=2"], "trainer.max_steps and trainer.num_train_epochs are both set"),
    ("learning_rate", ["trainer.learning_rate=0"], "trainer.learning_rate must be > 0"),
    ("batch_size", ["trainer.per_device_train_batch_size=0"], "trainer.per_device_train_batch_size must be >= 1"),
    ("tasks_mismatch", ["adapter.tasks=[parity, poetry]"], "adapter.tasks ['parity', 'poetry'] differ"),
    ("homogeneous_tiny_task", ["sampler.batch_composition=homogeneous", "trainer.per_device_train_batch_size=64"],
     ("task 'parity' has 48 examples, fewer than one micro-batch (batch_size=64)", "sampler.batch_composition")),
    ("not_a_section", ["trainer=3"], "trainer: Input should be a valid dictionary"),
    ("model_missing", ["model.name_or_path=/nonexistent/model"],
     ("/nonexistent/model does not exist", "model.name_or_path")),
]


@pytest.mark.parametrize("case,overrides,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors(capsys, tmp_path, tiny_model_dir, data, case, overrides, expected):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(base_cfg(tiny_model_dir, data, tmp_path / "out")))
    code, err = run_cli(capsys, ["train", str(cfg), *overrides])
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert_names(err, expected, tmp_path)
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing is written for a bad input"


DATA_CASES = [
    ("malformed", "parity/train.jsonl:2: malformed JSON"),
    ("missing_field", "parity/train.jsonl:2: missing field 'target'"),
    ("target_not_option", "parity/train.jsonl:2: field 'target' 'maybe' is not one of the 2 options"),
    ("labels_missing", ("parity/train.jsonl:2: field 'options' names labels.json", "parity/labels.json does not exist")),
    ("empty", "parity/train.jsonl: no rows, so task parity is empty"),
    ("duplicate_id", ("parity/train.jsonl:3: field 'id'", "is already used at <tmp>/data/parity/train.jsonl:2")),
    ("non_utf8", "parity/train.jsonl:49: not valid UTF-8"),
]


@pytest.mark.parametrize("how,expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_errors(capsys, tmp_path, tiny_model_dir, data, how, expected):
    bad = corrupt(data, tmp_path, how)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(base_cfg(tiny_model_dir, bad, tmp_path / "out")))
    code, err = run_cli(capsys, ["train", str(cfg)])
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert_names(err, expected, tmp_path)
    assert not (tmp_path / "out").exists()


def test_config_file_errors(capsys, tmp_path):
    code, err = run_cli(capsys, ["train", str(tmp_path / "missing.yaml")])
    assert code == 2 and "missing.yaml does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    code, err = run_cli(capsys, ["train", str(bad)])
    assert code == 2 and "is not valid YAML" in err and "line" in err
    good = tmp_path / "good.yaml"
    good.write_text("trainer: {max_steps: 2}\n")
    code, err = run_cli(capsys, ["train", str(good), "notanoverride"])
    assert code == 2 and "\n" not in err and "override 'notanoverride' is not of the form section.key=value" in err


def test_mlflow_unreachable_fails_before_workers(capsys, tmp_path, tiny_model_dir, data):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(base_cfg(tiny_model_dir, data, tmp_path / "out")))
    code, err = run_cli(capsys, ["train", str(cfg), f"mlflow.tracking_uri=http://127.0.0.1:{port}"])
    assert code == 2 and f"MLflow at http://127.0.0.1:{port} is unreachable" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_shows_traceback(tmp_path, where):
    """`--debug` before or after the sub-command: the exception propagates instead of a one-line error."""
    args = ["train", str(tmp_path / "missing.yaml")]
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", *args] if where == "before" else [*args, "--debug"])


def test_without_debug_the_same_error_is_one_line(tmp_path, capsys):
    code, err = run_cli(capsys, ["train", str(tmp_path / "missing.yaml")])
    assert code == 2 and "does not exist" in err and "\n" not in err and "Traceback" not in err
