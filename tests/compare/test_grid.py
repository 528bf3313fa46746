"""Cell keys (rlora/compare/grid.py): what changes a cell's result changes its key; where the run lives
does not, so a results folder copied to another clone or machine resumes there."""
import hashlib
import shutil

import pytest

from helpers import run_config, write_tasks
from rlora.compare.grid import cell_key, content_digest, plan
from rlora.config import ConfigError, TaskSpec


def key(data, out, **overrides):
    return cell_key(run_config("smollm2-135m", data, out, **overrides))


def test_the_key_ignores_where_data_and_outputs_live(tmp_path):
    data = write_tasks(tmp_path / "a" / "data")
    copy = tmp_path / "b" / "elsewhere"
    shutil.copytree(data, copy)
    ref = key(data, tmp_path / "out")
    assert key(copy, tmp_path / "other-out") == ref
    assert key(data, tmp_path / "out", ray__address="ray://head:10001", ray__storage_path="s3://bucket/runs",
               mlflow__tracking_uri="http://127.0.0.1:5000", mlflow__experiment_name="x", trainer__logging_steps=7,
               trainer__save_steps=5, trainer__run_name="named") == ref


def test_the_key_follows_data_contents_and_training_settings(tmp_path):
    data = write_tasks(tmp_path / "data")
    ref = key(data, tmp_path)
    assert key(data, tmp_path, trainer__seed=8) != ref
    assert key(data, tmp_path, trainer__learning_rate=1e-3) != ref
    assert key(data, tmp_path, adapter__method="lora") != ref
    dev = data / "parity" / "dev.jsonl"
    dev.write_text(dev.read_text().replace("even or odd", "odd or even", 1))
    assert key(data, tmp_path) != ref


def test_the_key_ignores_resume_fault_and_ray_bookkeeping(tmp_path):
    data = write_tasks(tmp_path / "data")
    ref = key(data, tmp_path)
    for name, value in [("trainer__resume_from_checkpoint", str(tmp_path / "ckpt")), ("trainer__fail_at_step", 3),
                        ("ray__dashboard_host", "0.0.0.0"), ("ray__num_to_keep", 5), ("ray__max_failures", 2)]:
        assert key(data, tmp_path, **{name: value}) == ref, name
    assert len(ref) == 12 and int(ref, 16) >= 0


def _digest(entries):
    h = hashlib.sha256()
    for name, data in entries:
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(data).digest())
    return "sha256:" + h.hexdigest()[:16]


def test_content_digest_by_hand(tmp_path):
    """sha256 over (relative name, NUL, sha256 of the bytes) of every file in name order; hidden files and
    folders left out; a single file by its own name; a missing path or None is returned as given."""
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_bytes(b"beta")
    (root / "sub" / "a.txt").write_bytes(b"alpha")
    (root / ".hidden").write_bytes(b"x")
    (root / ".git" / "c").write_bytes(b"y")
    (root / "sub" / ".cache").write_bytes(b"z")
    assert content_digest(str(root)) == _digest([("b.txt", b"beta"), ("sub/a.txt", b"alpha")])
    assert content_digest(str(root / "b.txt")) == _digest([("b.txt", b"beta")])
    assert content_digest(str(tmp_path / "nope")) == str(tmp_path / "nope")
    assert content_digest(None) is None and content_digest("") == ""


def _task_key(data, out, folder, source):
    cfg = run_config("smollm2-135m", data, out)
    cfg.data.tasks = [TaskSpec(name="parity", path=str(folder), hf_source=str(source))]
    return cell_key(cfg)


def test_task_folders_and_sources_count_by_contents(tmp_path):
    """A task's own folder and its hf_source file enter the key by their contents, not where they are."""
    data = write_tasks(tmp_path / "a" / "data")
    folder, source = tmp_path / "a" / "extra", tmp_path / "a" / "rows.json"
    shutil.copytree(data / "parity", folder)
    source.write_text('[{"q": "1", "a": "odd"}]')
    folder2, source2 = tmp_path / "b" / "moved", tmp_path / "b" / "rows.json"  # a file: by its name and bytes
    shutil.copytree(folder, folder2)
    shutil.copy(source, source2)
    ref = _task_key(data, tmp_path, folder, source)
    assert _task_key(data, tmp_path, folder2, source2) == ref
    source2.write_text('[{"q": "2", "a": "even"}]')
    assert _task_key(data, tmp_path, folder2, source2) != ref
    shutil.copy(source, source2)
    (folder2 / "dev.jsonl").write_text((folder2 / "dev.jsonl").read_text().replace("even or odd", "odd or even", 1))
    assert _task_key(data, tmp_path, folder2, source2) != ref


def test_the_key_does_not_depend_on_mapping_order(tmp_path):
    data = write_tasks(tmp_path / "data")
    a, b = (run_config("smollm2-135m", data, tmp_path, sampler__strategy="probabilities") for _ in range(2))
    a.sampler.probabilities = {"parity": 0.5, "sign": 0.3, "size": 0.2}
    b.sampler.probabilities = {"size": 0.2, "sign": 0.3, "parity": 0.5}
    assert cell_key(a) == cell_key(b)


def test_plan_cells_seeds_ranks_names_and_overrides(tiny_model_dir, task_dir, tmp_path):
    """Seeds outer, arms inner; LoRA at the budget rank 6 (tests/compare/test_budget.py) with rsLoRA's alpha
    scaled by sqrt(6 / 4); an arm's overrides apply to its cells only and are kept on them."""
    cfg = run_config(tiny_model_dir, task_dir, tmp_path, adapter__r=4, adapter__num_heads=2, adapter__alpha=8,
                     adapter__rslora=True, adapter__tasks=["parity", "sign", "size"])
    out = tmp_path / "cmp"
    cells = plan(cfg, [("lora", "proportional"), ("hydra", "uniform")], 2, "ab", out,
                 overrides={("hydra", "uniform"): ["trainer.learning_rate=0.003"]})
    assert [(c.method, c.sampler, c.seed) for c in cells] == [("lora", "proportional", 7), ("hydra", "uniform", 7),
                                                            ("lora", "proportional", 8), ("hydra", "uniform", 8)]
    for c in cells:
        assert (c.cfg.adapter.method, c.cfg.sampler.strategy, c.cfg.trainer.seed) == (c.method, c.sampler, c.seed)
        assert c.cfg.trainer.output_dir == str(out / "runs") and c.key == cell_key(c.cfg)
        assert c.cfg.trainer.run_name == f"cmp-{c.method}-{c.sampler}-s{c.seed}-{c.key[:6]}"
    lora, hydra = cells[0], cells[1]
    assert lora.cfg.adapter.r == 6 and lora.cfg.adapter.alpha == pytest.approx(8 * 1.5 ** 0.5, rel=1e-12)
    assert (hydra.cfg.adapter.r, hydra.cfg.adapter.alpha) == (4, 8)
    assert hydra.overrides == ("trainer.learning_rate=0.003",) and lora.overrides == ()
    assert (hydra.cfg.trainer.learning_rate, lora.cfg.trainer.learning_rate) == (0.003, 5e-3)
    assert lora.params == {"ab": 6 * 416, "total": 6 * 416}
    with pytest.raises(ConfigError, match=r"^overrides: trainer.learning_rate: trainer.learning_rate must be > 0, "
                                          r"got -1.0$"):
        plan(cfg, [("lora", "proportional")], 1, "ab", out,
             overrides={("lora", "proportional"): ["trainer.learning_rate=-1"]})
