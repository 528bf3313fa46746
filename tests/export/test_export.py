"""End-to-end exports on a tiny random Llama: PEFT and merged exports reproduce the adapter's logits
(lora, mtl), the average-gate fold (hydra, rlora) reports its measured error, multihead round-trips."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import rlora
from rlora.export import ExportError, export
from rlora.export.api import REPORT_NAME

from .conftest import TASKS, adapter_logits, sample_ids

TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from rlora.models import load_tokenizer

    return load_tokenizer(str(base_dir))


def _base_logits(base_dir, ids, mask):
    with torch.no_grad():
        return rlora.load_base_model(str(base_dir))(input_ids=ids, attention_mask=mask).logits


def _peft_logits(base_dir, peft_dir, ids, mask):
    from peft import PeftModel  # a dev dependency: without it these tests fail, they do not skip
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(peft_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", ["lora", "mtl"])
def test_peft_export_reloads_in_peft_with_equal_logits(method, base_dir, adapters, tokenizer, tmp_path):
    task = "beta"
    out = export(adapters[method], task=task, format="peft", out=tmp_path / "peft")
    ids, mask = sample_ids(tokenizer)
    tid = TASKS.index(task) if method == "mtl" else None
    want = adapter_logits(base_dir, adapters[method], tid, ids, mask)
    got = _peft_logits(base_dir, out, ids, mask)
    base = _base_logits(base_dir, ids, mask)
    assert (want - base).abs().max() > 1e-2                 # the adapter changes the model: a real check
    assert (got - want).abs().max() <= TOL
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["exact"] is True and report["method"] == method


def _cli_export(adapter, out, *args) -> Path:
    """`rlora export ADAPTER --out OUT ARGS...` through the command line's entry point."""
    from rlora.cli import main

    assert main(["export", str(adapter), "--out", str(out), *args]) == 0
    return out


def test_mtl_peft_export_depends_on_task(base_dir, adapters, tokenizer, tmp_path):
    """`rlora export --task`: each task's export reproduces that task's logits, and the two differ."""
    ids, mask = sample_ids(tokenizer)
    a = _peft_logits(base_dir, _cli_export(adapters["mtl"], tmp_path / "a", "--task", "alpha"), ids, mask)
    b = _peft_logits(base_dir, _cli_export(adapters["mtl"], tmp_path / "b", "--task", "beta"), ids, mask)
    assert (a - b).abs().max() > 1e-3
    assert (a - adapter_logits(base_dir, adapters["mtl"], 0, ids, mask)).abs().max() <= TOL
    assert (b - adapter_logits(base_dir, adapters["mtl"], 1, ids, mask)).abs().max() <= TOL


def test_adapter_tasks_name_the_task_ids(base_dir, adapters, tokenizer, tmp_path):
    """``adapter.tasks``: task id i is ``tasks[i]``. The same mtl weights with the list reversed in the
    adapter's config export, under the name alpha, the update that task id 1 makes."""
    import shutil

    from rlora.adapter_io import CONFIG_NAME

    flipped = tmp_path / "flipped"
    shutil.copytree(adapters["mtl"], flipped)
    meta = json.loads((flipped / CONFIG_NAME).read_text())
    assert meta["tasks"] == TASKS
    (flipped / CONFIG_NAME).write_text(json.dumps(dict(meta, tasks=TASKS[::-1])))
    ids, mask = sample_ids(tokenizer)
    got = _peft_logits(base_dir, _cli_export(flipped, tmp_path / "o", "--task", "alpha"), ids, mask)
    assert (got - adapter_logits(base_dir, adapters["mtl"], 1, ids, mask)).abs().max() <= TOL
    assert (got - adapter_logits(base_dir, adapters["mtl"], 0, ids, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["lora", "mtl"])
def test_merged_export_reloads_with_automodel_and_equal_logits(method, base_dir, adapters, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _cli_export(adapters[method], tmp_path / "merged", "--task", "alpha", "--format", "merged")
    assert not (out / "adapter_config.json").exists()       # a whole model, not a PEFT adapter (the default)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    ids, mask = sample_ids(tokenizer)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    want = adapter_logits(base_dir, adapters[method], 0 if method == "mtl" else None, ids, mask)
    assert (want - _base_logits(base_dir, ids, mask)).abs().max() > 1e-2
    assert (got - want).abs().max() <= TOL
    assert not any("lora" in k for k in model.state_dict())


@pytest.mark.parametrize("method,rank", [("hydra", 4), ("rlora", 8)])
def test_routed_export_reports_measured_error(method, rank, base_dir, adapters, data_dir, tokenizer, tmp_path):
    out = export(adapters[method], task="beta", format="peft", out=tmp_path / "peft", data=data_dir, max_examples=4)
    report = json.loads((out / REPORT_NAME).read_text())
    err = report["relative_logit_error"]
    assert report["exact"] is False and report["rank"] == rank and report["dev_examples"] == 4
    assert math.isfinite(err) and err > 0
    gates = report["average_gates"]
    assert len(gates) == 2 * 7                                # 2 layers x 7 target modules
    for g in gates.values():
        assert len(g) == 3 and abs(sum(g) - 1) < 1e-4
    # the reported error is the error of the PEFT export itself, recomputed here through PEFT
    from rlora.export.fold import load_dev_examples, token_batches

    batch = token_batches(tokenizer, load_dev_examples(data_dir, "beta", 4), batch_size=4)[0]
    m = batch.attention_mask.bool()
    want = adapter_logits(base_dir, adapters[method], None, batch.input_ids, batch.attention_mask)[m].double()
    got = _peft_logits(base_dir, out, batch.input_ids, batch.attention_mask)[m].double()
    assert ((got - want).norm() / want.norm()).item() == pytest.approx(err, rel=1e-3)


def test_routed_fold_is_exact_when_gates_are_constant(base_dir, data_dir, tokenizer, tmp_path):
    """A zero router gives g = 1/N for every token, so the average-gate fold is exact (offset included)."""
    from .conftest import make_adapter_model

    model = make_adapter_model(base_dir, "rlora", router=False)
    adapter = rlora.save_adapter(model, tmp_path / "adapter")
    out = export(adapter, task="alpha", format="merged", out=tmp_path / "merged", data=data_dir, max_examples=2)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["relative_logit_error"] < 1e-5
    assert all(abs(v - 1 / 3) < 1e-6 for g in report["average_gates"].values() for v in g)


def test_multihead_export_round_trips_exactly(base_dir, adapters, tmp_path):
    from rlora.adapter_io import adapter_state_dict

    out = export(adapters["rlora"], format="multihead", out=tmp_path / "mh")
    a = rlora.load_adapter(rlora.load_base_model(str(base_dir)), adapters["rlora"])
    b = rlora.load_adapter(rlora.load_base_model(str(base_dir)), out)
    sa, sb = adapter_state_dict(a), adapter_state_dict(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.rlora_config == a.rlora_config


def test_sources_training_output_and_ray_checkpoints(adapters, tmp_path):
    import shutil

    from rlora.export import resolve_source

    run = tmp_path / "outputs" / "run1"
    shutil.copytree(adapters["lora"], run / "adapter")
    assert resolve_source(run) == run / "adapter"
    ray = tmp_path / "ray" / "run1"
    for step in (2, 10):
        shutil.copytree(adapters["lora"], ray / f"checkpoint_{step:06d}" / "adapter")
    assert resolve_source(ray / "checkpoint_000002") == ray / "checkpoint_000002" / "adapter"
    assert resolve_source(ray) == ray / "checkpoint_000010" / "adapter"
    out = export(run, format="peft", out=tmp_path / "peft")
    assert (out / "adapter_model.safetensors").is_file()


def test_export_refuses_non_empty_out_and_overwrites_on_request(adapters, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--overwrite"):
        export(adapters["lora"], format="multihead", out=out)
    assert (out / "keep.txt").is_file()
    _cli_export(adapters["lora"], out, "--format", "multihead", "--overwrite")   # `rlora export --overwrite`
    assert not (out / "keep.txt").exists() and (out / "rlora_adapter.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]    # no temp dirs left beside it


# ----------------------------------------------------------------------------------------------
# one-line errors through the CLI (exit 2)
# ----------------------------------------------------------------------------------------------
def _cli(capsys, *argv) -> tuple[int, str]:
    from rlora.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_cli_unknown_task_lists_the_tasks(adapters, tmp_path, capsys):
    code, err = _cli(capsys, "export", str(adapters["mtl"]), "--task", "gamma", "--out", str(tmp_path / "o"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "gamma" in err and "alpha" in err and "beta" in err
    assert not (tmp_path / "o").exists()


def test_cli_missing_task_for_multihead_methods(adapters, tmp_path, capsys):
    code, err = _cli(capsys, "export", str(adapters["hydra"]), "--out", str(tmp_path / "o"))
    assert code == 2 and "--task is required" in err and len(err.splitlines()) == 1


def test_cli_routed_export_needs_data(adapters, tmp_path, capsys):
    code, err = _cli(capsys, "export", str(adapters["rlora"]), "--task", "alpha", "--out", str(tmp_path / "o"))
    assert code == 2 and "--data" in err and len(err.splitlines()) == 1


def test_cli_missing_source(tmp_path, capsys):
    code, err = _cli(capsys, "export", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1


def test_cli_source_without_adapter(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _cli(capsys, "export", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "holds no adapter" in err


def test_cli_run_id_without_tracking_uri(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, err = _cli(capsys, "export", "0123456789abcdef0123456789abcdef", "--out", str(tmp_path / "o"))
    assert code == 2 and "--tracking-uri" in err


def test_cli_export_prints_summary(adapters, tmp_path, capsys):
    from rlora.cli import main

    assert main(["export", str(adapters["lora"]), "--format", "peft", "--out", str(tmp_path / "o")]) == 0
    assert "peft export of lora (exact" in capsys.readouterr().out


def test_cli_base_model_overrides_the_recorded_one(adapters, base_dir, tmp_path, capsys):
    """`--base-model`: the adapter's recorded base folder is gone (moved); the export loads the one named, and
    the exported PEFT adapter points at it."""
    import shutil

    from rlora.cli import main

    moved = tmp_path / "moved-base"
    shutil.copytree(base_dir, moved)
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["lora"], adapter)
    meta = json.loads((adapter / "rlora_adapter.json").read_text())
    meta["base_model"] = str(tmp_path / "no-such-base")
    (adapter / "rlora_adapter.json").write_text(json.dumps(meta))
    assert main(["export", str(adapter), "--format", "peft", "--out", str(tmp_path / "a")]) == 2
    assert "no-such-base" in capsys.readouterr().err
    assert main(["export", str(adapter), "--format", "peft", "--out", str(tmp_path / "b"),
                 "--base-model", str(moved)]) == 0
    peft_cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == str(moved)


def test_cli_max_length_truncates_the_rows_that_measure_the_gates(adapters, data_dir, tmp_path):
    """`--max-length`: the routed export measures its average gates on dev rows cut to that many tokens."""
    from rlora.cli import main

    reports = {}
    for n in (8, 256):
        out = tmp_path / f"len{n}"
        assert main(["export", str(adapters["hydra"]), "--task", "beta", "--format", "peft", "--data", str(data_dir),
                     "--max-examples", "4", "--max-length", str(n), "--out", str(out)]) == 0
        reports[n] = json.loads((out / REPORT_NAME).read_text())
    assert reports[8]["dev_examples"] == reports[256]["dev_examples"] == 4
    assert reports[8]["dev_tokens"] == 4 * 8 < reports[256]["dev_tokens"]     # every row cut to 8 tokens
    assert reports[8]["average_gates"] != reports[256]["average_gates"]
