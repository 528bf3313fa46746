"""Reading task folders: the happy path and every kind of bad input (one-line DataError messages)."""
import json
from pathlib import Path

import pytest
from .synthetic_rows import row, write_jsonl

from rlora.config import DataConfig, TaskSpec
from rlora.data import DataError, load_tasks, read_task_dir, task_names

DEMO = Path(__file__).resolve().parents[2] / "examples" / "data" / "bigbench_default"


def raises_one_line(match, fn, *args, **kwargs):
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_reads_rows_with_inline_options(make_task):
    folder = make_task("alpha", n_train=4)
    exs = read_task_dir(folder, "train")
    assert [e.id for e in exs] == [f"alpha-{i}" for i in range(4)]
    assert exs[0].options == ["yes", "no"] and exs[0].target == "no" and exs[0].label == 1
    assert exs[0].options is exs[1].options          # one shared list per distinct option list


def test_labels_file_and_free_form_rows(tmp_path):
    folder = tmp_path / "intents"
    (folder).mkdir()
    (folder / "labels.json").write_text(json.dumps(["card_lost", "refund", "top_up"]))
    write_jsonl(folder / "train.jsonl", [row("intents", 0, target="refund", options="labels.json"),
                                         {"task": "intents", "id": 7, "input": "fill in", "options": None,
                                          "target": "steak."}])
    exs = read_task_dir(folder, "train")
    assert exs[0].options == ["card_lost", "refund", "top_up"] and exs[0].label == 1
    assert exs[1].options is None and exs[1].id == "7" and not exs[1].is_multiple_choice


def test_blank_lines_and_bom_are_accepted(tmp_path):
    f = tmp_path / "t" / "train.jsonl"
    f.parent.mkdir()
    f.write_bytes(("\ufeff" + json.dumps(row("t", 0)) + "\n\n" + json.dumps(row("t", 1)) + "\n").encode())
    assert len(read_task_dir(f.parent, "train")) == 2


def test_malformed_json_line(tmp_path):
    write_jsonl(tmp_path / "t" / "train.jsonl", [row("t", 0)], raw_lines=['{"id": "t-9", "input": '])
    msg = raises_one_line(r"train\.jsonl:2: malformed JSON", read_task_dir, tmp_path / "t", "train")
    assert "one JSON object per line" in msg


def test_row_not_an_object(tmp_path):
    write_jsonl(tmp_path / "t" / "train.jsonl", [], raw_lines=["[1, 2]"])
    raises_one_line(r"train\.jsonl:1: a row must be a JSON object", read_task_dir, tmp_path / "t", "train")


@pytest.mark.parametrize("field", ["id", "input", "options", "target"])
def test_missing_field(tmp_path, field):
    bad = row("t", 1)
    del bad[field]
    write_jsonl(tmp_path / "t" / "train.jsonl", [row("t", 0), bad])
    raises_one_line(rf"train\.jsonl:2: missing field '{field}'", read_task_dir, tmp_path / "t", "train")


def test_wrong_field_types(tmp_path):
    write_jsonl(tmp_path / "t" / "train.jsonl", [dict(row("t", 0), target=3)])
    raises_one_line(r"train\.jsonl:1: field 'target' must be a non-empty string", read_task_dir, tmp_path / "t", "train")
    write_jsonl(tmp_path / "u" / "train.jsonl", [dict(row("u", 0), options=["yes", 2])])
    raises_one_line(r"train\.jsonl:1: field 'options' holds 2", read_task_dir, tmp_path / "u", "train")
    write_jsonl(tmp_path / "v" / "train.jsonl", [dict(row("v", 0), options="yes,no")])
    raises_one_line(r"field 'options' is the string 'yes,no'", read_task_dir, tmp_path / "v", "train")


def test_target_not_among_options(tmp_path):
    write_jsonl(tmp_path / "t" / "dev.jsonl", [row("t", 0), row("t", 1, target="maybe")])
    msg = raises_one_line(r"dev\.jsonl:2: field 'target' 'maybe' is not one of the 2 options",
                          read_task_dir, tmp_path / "t", "dev")
    assert "fix the target" in msg


def test_labels_file_missing(tmp_path):
    write_jsonl(tmp_path / "t" / "train.jsonl", [row("t", 0, options="labels.json")])
    msg = raises_one_line(r"train\.jsonl:1: field 'options' names labels\.json, but .*labels\.json does not exist",
                          read_task_dir, tmp_path / "t", "train")
    assert "add the labels file" in msg


def test_labels_file_not_a_list(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "labels.json").write_text('{"a": 1}')
    write_jsonl(tmp_path / "t" / "train.jsonl", [row("t", 0, options="labels.json")])
    raises_one_line(r"labels\.json: must be a non-empty JSON list", read_task_dir, tmp_path / "t", "train")


def test_empty_task(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text("\n\n")
    raises_one_line(r"train\.jsonl: no rows, so task t is empty", read_task_dir, tmp_path / "t", "train")


def test_duplicate_id_within_a_file(tmp_path):
    write_jsonl(tmp_path / "t" / "train.jsonl", [row("t", 0), row("t", 1), row("t", 0)])
    raises_one_line(r"train\.jsonl:3: field 'id' 't-0' is already used at .*train\.jsonl:1",
                    read_task_dir, tmp_path / "t", "train")


def test_duplicate_id_across_files(tmp_path):
    write_jsonl(tmp_path / "t" / "train.jsonl", [row("t", 0), row("t", 1)])
    write_jsonl(tmp_path / "t" / "dev.jsonl", [row("t", 5), row("t", 1)])
    msg = raises_one_line(r"train\.jsonl:2: field 'id' 't-1' is already used at .*dev\.jsonl:2",
                          read_task_dir, tmp_path / "t", "dev")
    assert "across its files" in msg
    assert len(read_task_dir(tmp_path / "t", "dev", check_ids_across_files=False)) == 2


def test_non_utf8_file(tmp_path):
    f = tmp_path / "t" / "train.jsonl"
    f.parent.mkdir()
    good = json.dumps(row("t", 0)).encode()
    bad = json.dumps(row("t", 1, text="caf\u00e9"), ensure_ascii=False).encode("utf-8").replace(b"\xc3\xa9", b"\xe9")
    f.write_bytes(good + b"\n" + bad + b"\n")
    raises_one_line(r"train\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column \d+\): re-save the file as UTF-8",
                    read_task_dir, f.parent, "train")


def test_missing_split_file_and_folder(make_task, tmp_path):
    folder = make_task("alpha")
    raises_one_line(r"test\.jsonl does not exist \(splits here: dev, train\)", read_task_dir, folder, "test")
    raises_one_line(r"task folder .*nowhere does not exist", read_task_dir, tmp_path / "nowhere", "train")


def test_missing_data_path():
    raises_one_line(r"data\.path .*no_such_dir does not exist", load_tasks, DataConfig(path="/no_such_dir"))
    raises_one_line(r"data\.path is not set and data\.tasks is empty", load_tasks, DataConfig())


def test_missing_task_folder(make_task, tmp_path):
    make_task("alpha")
    cfg = DataConfig(path=str(tmp_path / "data"), tasks=[TaskSpec(name="alpha"), TaskSpec(name="ghost")])
    raises_one_line(r"task folder .*data/ghost does not exist", load_tasks, cfg)


def test_data_path_without_task_folders(tmp_path):
    (tmp_path / "README.md").write_text("x")
    raises_one_line(r"has no task folders", load_tasks, DataConfig(path=str(tmp_path)))


def test_task_order_and_limits(make_task, tmp_path):
    for name in ("zeta", "alpha", "mid"):
        make_task(name, n_train=6, n_dev=3)
    root = str(tmp_path / "data")
    assert list(load_tasks(DataConfig(path=root))) == ["alpha", "mid", "zeta"]
    assert task_names(DataConfig(path=root)) == ["alpha", "mid", "zeta"]
    cfg = DataConfig(path=root, max_train_examples_per_task=4,
                     tasks=[TaskSpec(name="zeta", max_examples=2), TaskSpec(name="alpha")])
    train = load_tasks(cfg, "train")
    assert list(train) == ["zeta", "alpha"]
    assert [len(v) for v in train.values()] == [2, 4]
    assert [e.id for e in train["alpha"]] == [f"alpha-{i}" for i in range(4)]     # the first rows
    dev = load_tasks(cfg, "dev")                     # max_train_examples_per_task is train only
    assert [len(v) for v in dev.values()] == [2, 3]


def test_task_path_override_and_bad_limits(make_task, tmp_path):
    folder = make_task("alpha", root=tmp_path / "elsewhere")
    cfg = DataConfig(tasks=[TaskSpec(name="renamed", path=str(folder))])
    exs = load_tasks(cfg)["renamed"]
    assert len(exs) == 4 and all(e.task == "renamed" for e in exs)
    raises_one_line(r"max_examples must be >= 1", load_tasks,
                    DataConfig(tasks=[TaskSpec(name="a", path=str(folder), max_examples=0)]))
    raises_one_line(r"names \['a'\] more than once", load_tasks,
                    DataConfig(tasks=[TaskSpec(name="a", path=str(folder)), TaskSpec(name="a", path=str(folder))]))
    raises_one_line(r"no path and data\.path is not set", load_tasks, DataConfig(tasks=[TaskSpec(name="a")]))


def _readme_counts(readme: Path) -> dict[str, tuple[int, int]]:
    counts = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1].isdigit() and cells[2].isdigit():
            counts[cells[0]] = (int(cells[1]), int(cells[2]))
    return counts


def test_shipped_demo_data_loads_cleanly():
    expected = _readme_counts(DEMO / "README.md")
    assert len(expected) == 6
    cfg = DataConfig(path=str(DEMO))
    train, dev = load_tasks(cfg, "train"), load_tasks(cfg, "dev")
    assert list(train) == sorted(expected)
    assert {k: (len(train[k]), len(dev[k])) for k in train} == expected
    assert sum(len(v) for v in train.values()) == 5374 and sum(len(v) for v in dev.values()) == 1200
    assert all(e.options is not None and e.target in e.options for v in dev.values() for e in v)
