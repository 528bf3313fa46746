"""Data sets of a comparison (rlora/compare/datasets.py): the validation carve and the derived mtl_gpu12_rest."""
import json
import shutil
from pathlib import Path

import pytest

from helpers import SHARED_DATA as SHARED, write_tasks
from rlora.compare.datasets import build_subset, carve_validation, resolve_sets
from rlora.config import ConfigError, DataConfig
from rlora.data import load_tasks


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def test_validation_rows_are_disjoint_from_dev_and_from_the_training_rows(tmp_path):
    src = write_tasks(tmp_path / "src", n_train=40, n_dev=8)
    out = carve_validation(src, tmp_path / "carved", rows=10, seed=3)
    for task in ("parity", "sign", "size"):
        train, val, dev = (ids(out / task / f"{s}.jsonl") for s in ("train", "val", "dev"))
        assert len(val) == 10 and len(train) == 30
        assert not set(val) & set(dev) and not set(val) & set(train)
        assert sorted(train + val) == sorted(ids(src / task / "train.jsonl"))   # nothing lost, nothing added
        assert (out / task / "dev.jsonl").read_bytes() == (src / task / "dev.jsonl").read_bytes()
        original = ids(src / task / "train.jsonl")
        assert train == [i for i in original if i in set(train)]              # file order kept
    # the loader reads the carved folder's splits (and checks ids across its files)
    rows = load_tasks(DataConfig(path=str(out)), "val")
    assert {t: len(v) for t, v in rows.items()} == {"parity": 10, "sign": 10, "size": 10}
    # deterministic by seed: the same bytes again, other rows with another seed
    before = (out / "sign" / "val.jsonl").read_bytes()
    carve_validation(src, tmp_path / "carved", rows=10, seed=3)
    assert (out / "sign" / "val.jsonl").read_bytes() == before
    other = carve_validation(src, tmp_path / "other", rows=10, seed=4)
    assert ids(other / "sign" / "val.jsonl") != ids(out / "sign" / "val.jsonl")


def test_too_many_validation_rows_is_a_one_line_error(tmp_path):
    src = write_tasks(tmp_path / "src", n_train=12, n_dev=4)
    with pytest.raises(ConfigError, match="task parity of .* has 12 training rows: --val-rows 7 would leave fewer "
                                          "than half to train on; lower --val-rows"):
        carve_validation(src, tmp_path / "c", rows=7, seed=0)


@pytest.mark.skipif(not (SHARED / "mtl_gpu12").is_dir(), reason="needs ../shared/data")
def test_mtl_gpu12_rest_is_the_six_other_tasks_at_mtl_cpu6_size(tmp_path):
    """Built from ../shared/data at run time: the tasks of mtl_gpu12 that mtl_cpu6 lacks, at most 1,000 train and
    200 dev rows each (arc_challenge has 919 train rows: all kept), every row one of the source's, labels copied."""
    sets = resolve_sets(["mtl_cpu6", "mtl_gpu12_rest"], SHARED, tmp_path / "data")
    assert sets["mtl_cpu6"] == (SHARED / "mtl_cpu6").resolve()
    rest = sets["mtl_gpu12_rest"]
    assert rest == tmp_path / "data" / "mtl_gpu12_rest"
    tasks = sorted(p.name for p in rest.iterdir())
    assert tasks == ["arc_challenge", "clinc150", "fever", "tweet_hate", "tweet_irony", "winogrande_ni"]
    for t in tasks:
        for split, cap in (("train", 1000), ("dev", 200)):
            got, source = ids(rest / t / f"{split}.jsonl"), ids(SHARED / "mtl_gpu12" / t / f"{split}.jsonl")
            assert len(got) == min(cap, len(source)) and set(got) <= set(source)
    assert len(ids(rest / "arc_challenge" / "train.jsonl")) == 919
    labels = "clinc150/labels.json"
    assert (rest / labels).read_bytes() == (SHARED / "mtl_gpu12" / labels).read_bytes()
    before = {p: p.read_bytes() for p in rest.rglob("*.jsonl")}
    build_subset(SHARED / "mtl_gpu12", SHARED / "mtl_cpu6", rest)
    assert {p: p.read_bytes() for p in rest.rglob("*.jsonl")} == before


def test_unknown_set_names_the_choices(tmp_path):
    root = tmp_path / "root"
    write_tasks(root / "alpha")
    assert resolve_sets([str(root / "alpha")], None, tmp_path / "w") == {"alpha": (root / "alpha").resolve()}
    with pytest.raises(ConfigError, match=r"--sets beta: .* does not exist: use a folder, one of \['alpha'\] in"):
        resolve_sets(["beta"], root, tmp_path / "w")


def test_every_task_and_set_is_checked_before_anything_is_written(tmp_path):
    src = write_tasks(tmp_path / "src", n_train=12, n_dev=4)
    rows = (src / "size" / "train.jsonl").read_text().splitlines(keepends=True)
    (src / "size" / "train.jsonl").write_text("".join(rows[:6]))     # the last task only: 6 rows
    with pytest.raises(ConfigError, match="task size of .* has 6 training rows: --val-rows 4 would leave"):
        carve_validation(src, tmp_path / "c", rows=4, seed=0)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="task size of .* has 6 training rows: --val-rows 4"):
        resolve_sets([str(src)], None, tmp_path / "w", val_rows=4)
    assert resolve_sets([str(src)], None, tmp_path / "w", val_rows=3) == {"src": src.resolve()}


def test_a_carved_folder_holding_other_data_is_refused_not_trained_on(tmp_path):
    """A task (or file) left in the carved folder from an older carve of other data would be trained on and scored
    as part of the set: the carve names it and the fix, and writes nothing."""
    src = write_tasks(tmp_path / "src", n_train=20, n_dev=4)
    out = carve_validation(src, tmp_path / "carved", rows=4, seed=0)
    write_tasks(tmp_path / "old", n_train=20, n_dev=4)
    (tmp_path / "old" / "sign").rename(out / "gone")
    (out / "size" / "labels.json").write_text("{}")
    before = (out / "parity" / "val.jsonl").read_bytes()
    with pytest.raises(ConfigError) as err:
        carve_validation(src, out, rows=5, seed=0)
    assert str(err.value) == (f"{out} holds ['gone/', 'size/labels.json'] that a carve of {src} does not write "
                              f"(an older carve of other data): remove {out}")
    assert (out / "parity" / "val.jsonl").read_bytes() == before      # nothing rewritten
    (out / "size" / "labels.json").unlink()
    shutil.rmtree(out / "gone")
    assert carve_validation(src, out, rows=4, seed=0) == out


def test_a_folder_named_like_a_derived_set_is_used_as_a_folder_by_check_and_resolve(tmp_path, monkeypatch):
    """check_sets and resolve_sets read a name in the same order: an existing folder first, then a derived set."""
    monkeypatch.chdir(tmp_path)
    write_tasks(tmp_path / "mtl_gpu12_rest", n_train=8, n_dev=4)
    got = resolve_sets(["mtl_gpu12_rest"], tmp_path / "no_root", tmp_path / "w")
    assert got == {"mtl_gpu12_rest": (tmp_path / "mtl_gpu12_rest").resolve()} and not (tmp_path / "w").exists()
