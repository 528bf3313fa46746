"""Tasks read from local Hugging Face datasets sources with a column mapping."""
import json

import pandas as pd
import pytest

from rlora.config import DataConfig, TaskSpec
from rlora.data import DataError, load_tasks, read_hf_source


def _frame(n, offset=0):
    return pd.DataFrame({"text": [f"synthetic sentence {offset + i}" for i in range(n)],
                         "answer": ["good" if i % 3 else "bad" for i in range(n)],
                         "choices": [["bad", "good"]] * n,
                         "uid": [f"u{offset + i}" for i in range(n)]})


def test_parquet_with_split_placeholder_and_mapping(tmp_path):
    _frame(5).to_parquet(tmp_path / "toy_train.parquet")
    _frame(3, offset=100).to_parquet(tmp_path / "toy_dev.parquet")
    spec = TaskSpec(name="toy", hf_source=str(tmp_path / "toy_{split}.parquet"),
                    columns={"input": "text", "target": "answer", "options": "choices", "id": "uid"})
    cfg = DataConfig(tasks=[spec])
    train, dev = load_tasks(cfg, "train")["toy"], load_tasks(cfg, "dev")["toy"]
    assert [e.id for e in train] == [f"u{i}" for i in range(5)] and len(dev) == 3
    assert train[0].target == "bad" and train[0].options == ["bad", "good"] and train[0].task == "toy"
    assert train[0].options is train[1].options


def test_saved_datasetdict_with_classlabel(tmp_path):
    import datasets

    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 1]}, features=feats),
        "validation": datasets.Dataset.from_dict({"sentence": ["d"], "label": [1]}, features=feats)})
    dd.save_to_disk(str(tmp_path / "saved"))
    cols = {"input": "sentence", "target": "label"}
    train = read_hf_source("senti", str(tmp_path / "saved"), cols, "train")
    assert [(e.id, e.target, e.options) for e in train] == [
        ("senti-0", "negative", ["negative", "positive"]), ("senti-1", "positive", ["negative", "positive"]),
        ("senti-2", "positive", ["negative", "positive"])]
    dev = read_hf_source("senti", str(tmp_path / "saved"), cols, "dev")      # 'dev' finds 'validation'
    assert [e.target for e in dev] == ["positive"]
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train, validation\)"):
        read_hf_source("senti", str(tmp_path / "saved"), cols, "test")


def test_task_column_filters_a_multitask_file(tmp_path):
    rows = [{"task": t, "input": f"q{i}", "target": "x", "options": ["x", "y"]} for i, t in enumerate("abab")]
    path = tmp_path / "mixed_train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    exs = read_hf_source("b", str(tmp_path / "mixed_{split}.jsonl"), {"task": "task"}, "train")
    assert [e.input for e in exs] == ["q1", "q3"] and [e.id for e in exs] == ["b-1", "b-3"]
    with pytest.raises(DataError, match=r"no rows with task == 'c', so task c is empty"):
        read_hf_source("c", str(tmp_path / "mixed_{split}.jsonl"), {"task": "task"}, "train")


def test_free_form_without_options_column(tmp_path):
    pd.DataFrame({"input": ["fill the gap"], "target": ["steak."]}).to_csv(tmp_path / "gen.csv", index=False)
    (ex,) = read_hf_source("gen", str(tmp_path / "gen.csv"))
    assert ex.options is None and ex.target == "steak."


@pytest.mark.parametrize("columns, split, pattern", [
    ({"input": "nope"}, "train", r"column 'nope' \(for input\) not found; columns are .*: set data.tasks\[t\]\.columns\.input"),
    ({"label": "answer"}, "train", r"data\.tasks\[t\]\.columns: unknown key 'label'"),
    ({"input": "text", "target": "answer"}, "dev", r"one file, used as the train split only"),
])
def test_bad_sources(tmp_path, columns, split, pattern):
    _frame(2).to_parquet(tmp_path / "one.parquet")
    with pytest.raises(DataError, match=pattern) as info:
        read_hf_source("t", str(tmp_path / "one.parquet"), columns, split)
    assert "\n" not in str(info.value)


def test_bad_rows_and_paths(tmp_path):
    df = _frame(3)
    df.loc[1, "answer"] = "meh"
    df.to_parquet(tmp_path / "bad.parquet")
    cols = {"input": "text", "target": "answer", "options": "choices"}
    with pytest.raises(DataError, match=r"bad\.parquet: row 1: field 'target' 'meh' is not one of the 2 options"):
        read_hf_source("t", str(tmp_path / "bad.parquet"), cols)
    with pytest.raises(DataError, match=r"missing\.parquet does not exist: fix data\.tasks\[t\]\.hf_source"):
        read_hf_source("t", str(tmp_path / "missing.parquet"), cols)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_hf_source("t", str(tmp_path / "x.txt"))
    dup = _frame(2)
    dup["uid"] = ["same", "same"]
    dup.to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(DataError, match=r"row 1: field 'id' 'same' is already used at .*row 0"):
        read_hf_source("t", str(tmp_path / "dup.parquet"), dict(cols, id="uid"))
