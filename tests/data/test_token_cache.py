"""The on-disk token cache (rlora.data.token_cache): the rows are those of encode_example, a changed
source file / tokenizer / max_length / template rebuilds and an unchanged one is reused, two processes
share one build through a memory map, and the sampler order, its resume digest and the batches are the
ones of the in-memory path."""
import copy
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import run_config
from rlora.config import DataConfig, TaskSpec
from rlora.data import DataError, encode_example, load_tasks, prompt_templates, tokenize_tasks
from rlora.data import token_cache as tc
from rlora.train.batches import left_padded_batch
from rlora.train.data_setup import build_sampler, load_train_data

from .synthetic_rows import row, write_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "tokens"
    monkeypatch.setenv("RLORA_TOKEN_CACHE", str(root))
    return root


def write_task(root, name, n, long_every=0):
    rows = [row(name, i, target="yes" if i % 2 else "no",
                text=("long " * 60 if long_every and i % long_every == 0 else "") + f"q{i} for {name}?") for i in range(n)]
    write_jsonl(root / name / "train.jsonl", rows)
    write_jsonl(root / name / "dev.jsonl", [row(name, 1000 + i) for i in range(2)])
    return root / name


def reference(tokenizer, cfg: DataConfig) -> dict:
    """The rows as encode_example makes them, one by one (the path before the cache)."""
    temps = prompt_templates(cfg)
    return {n: [encode_example(tokenizer, ex, cfg.max_length, cfg.use_chat_template, temps[n]) for ex in exs]
            for n, exs in load_tasks(cfg, "train").items()}


@pytest.mark.parametrize("chat", [True, False])
def test_rows_equal_encode_example_and_truncation_is_counted(smol_tokenizer, tmp_path, cache_dir, chat, monkeypatch):
    monkeypatch.setattr(tc, "CHUNK_ROWS", 5)  # several record batches per task: rows across batch bounds
    write_task(tmp_path / "d", "alpha", 13, long_every=4)
    write_task(tmp_path / "d", "beta", 7)
    cfg = DataConfig(path=str(tmp_path / "d"), max_length=48, use_chat_template=chat,
                     tasks=[{"name": "alpha"}, {"name": "beta", "prompt_template": "B {task}: {input} {options}"}])
    cache = tc.open_or_build(cfg, smol_tokenizer)
    ref = reference(smol_tokenizer, cfg)
    assert cache.names == ["alpha", "beta"] and cache.rows == 20 and cache.status == "built"
    assert [list(t) for t in cache.tasks.values()] == list(ref.values())
    assert cache.tasks["alpha"].num_truncated == 4 == sum(r["truncated"] for r in ref["alpha"])  # rows 0, 4, 8, 12
    assert cache.tasks["alpha"][-1] == ref["alpha"][12] and cache.tasks["alpha"][3:6] == ref["alpha"][3:6]
    assert len(cache.tasks["alpha"]._starts) == 4  # 5 + 5 + 3 rows
    with pytest.raises(IndexError):
        cache.tasks["beta"][7]


def test_hit_and_miss_on_file_tokenizer_max_length_and_template(smol_tokenizer, tmp_path, cache_dir):
    folder = write_task(tmp_path / "d", "alpha", 6)
    cfg = DataConfig(path=str(tmp_path / "d"), max_length=64)
    first = tc.open_or_build(cfg, smol_tokenizer)
    again = tc.open_or_build(cfg, smol_tokenizer)
    assert (first.status, again.status) == ("built", "reused") and again.folder == first.folder
    assert "reused (sources, tokenizer and max_length unchanged): 6 rows of 1 tasks" in again.note()
    assert again.note().startswith("[rlora] token cache reused") and first.note().startswith("[rlora] token cache built")

    # a changed row: a new key, rebuilt, the new text in the rows
    write_jsonl(folder / "train.jsonl", [row("alpha", i, text=f"changed {i}") for i in range(6)])
    changed = tc.open_or_build(cfg, smol_tokenizer)
    assert changed.status == "built" and changed.folder != first.folder
    assert "changed 0" in smol_tokenizer.decode(changed.tasks["alpha"][0]["input_ids"])
    # a labels file beside the data is part of the source too
    (folder / "labels.json").write_text('["yes", "no"]')
    assert tc.open_or_build(cfg, smol_tokenizer).status == "built"
    assert tc.open_or_build(cfg, smol_tokenizer).status == "reused"

    other = copy.deepcopy(smol_tokenizer)
    other.add_tokens(["<rlora-new-token>"])
    assert tc.tokenizer_fingerprint(other) != tc.tokenizer_fingerprint(smol_tokenizer)
    assert tc.open_or_build(cfg, other).status == "built"
    assert tc.open_or_build(cfg.model_copy(update={"max_length": 32}), smol_tokenizer).status == "built"
    assert tc.open_or_build(cfg.model_copy(update={"use_chat_template": False}), smol_tokenizer).status == "built"
    templated = cfg.model_copy(update={"tasks": [TaskSpec(name="alpha", prompt_template="T {input}")]})
    assert tc.open_or_build(templated, smol_tokenizer).status == "built"
    assert tc.open_or_build(cfg.model_copy(update={"max_train_examples_per_task": 3}), smol_tokenizer).rows == 3
    # every version is its own folder under $RLORA_TOKEN_CACHE, and clear() removes them all
    built = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert len(built) == 8 and all(tc.is_complete(p) for p in built)
    assert tc.clear() == 8 and not any(cache_dir.iterdir())
    assert tc.open_or_build(cfg, smol_tokenizer).status == "built"


def test_hf_source_task_goes_through_the_cache(smol_tokenizer, tmp_path, cache_dir):
    frame = pd.DataFrame({"text": [f"sentence {i}" for i in range(9)], "answer": ["good" if i % 3 else "bad" for i in range(9)],
                          "uid": [f"u{i}" for i in range(9)]})
    frame.to_parquet(tmp_path / "toy.parquet")
    spec = TaskSpec(name="toy", hf_source=str(tmp_path / "toy.parquet"), columns={"input": "text", "target": "answer", "id": "uid"})
    cfg = DataConfig(tasks=[spec], max_length=64)
    cache = tc.open_or_build(cfg, smol_tokenizer)
    assert list(cache.tasks["toy"]) == reference(smol_tokenizer, cfg)["toy"]
    assert tc.open_or_build(cfg, smol_tokenizer).status == "reused"
    frame.iloc[:5].to_parquet(tmp_path / "toy.parquet")
    assert tc.open_or_build(cfg, smol_tokenizer).rows == 5


def test_preflight_counts_rows_without_tokenizing_and_a_bad_row_fails_the_build(smol_tokenizer, tmp_path, cache_dir):
    write_task(tmp_path / "d", "alpha", 5)
    folder = write_task(tmp_path / "d", "beta", 3)
    cfg = DataConfig(path=str(tmp_path / "d"), max_length=64)
    assert tc.cached_sizes(cfg, smol_tokenizer) is None
    assert tc.check_rows(cfg) == {"alpha": 5, "beta": 3} and not cache_dir.exists()  # nothing built
    tc.open_or_build(cfg, smol_tokenizer)
    assert tc.cached_sizes(cfg, smol_tokenizer) == {"alpha": 5, "beta": 3}
    with open(folder / "train.jsonl", "a") as fh:
        fh.write('{"id": "beta-9", "input": "x", "options": ["yes"], "target": "no"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:4: field 'target' 'no' is not one of the 1 options"):
        tc.check_rows(cfg)
    with pytest.raises(DataError, match=r"train.jsonl:4: field 'target'"):
        tc.open_or_build(cfg, smol_tokenizer)
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1  # the build of the valid data only
    assert not list(cache_dir.glob(".*tmp-*"))  # the failed build left no partial folder


CHILD = textwrap.dedent("""
    import hashlib, json, sys, time
    from rlora.config import DataConfig
    from rlora.data import token_cache as tc
    from rlora.models import load_tokenizer
    tok = load_tokenizer(sys.argv[1])
    with open(sys.argv[3], "a") as fh:  # both processes are up: start together
        fh.write("x")
    while len(open(sys.argv[3]).read()) < 2:
        time.sleep(0.01)
    cache = tc.open_or_build(DataConfig(path=sys.argv[2], max_length=64), tok)
    arrow = str(cache.tasks["alpha"].path)
    mapped = any(line.rstrip().endswith(arrow) for line in open("/proc/self/maps"))
    digest = hashlib.sha256(json.dumps([list(t) for t in cache.tasks.values()]).encode()).hexdigest()
    print(json.dumps({"status": cache.status, "folder": str(cache.folder), "mapped": mapped, "digest": digest}))
""")


@pytest.mark.slow  # two Python processes importing torch + transformers (~5 s each)
def test_two_processes_read_one_cache_built_once(smol_tokenizer, tmp_path, cache_dir):
    from rlora.models import default_model_dir

    write_task(tmp_path / "d", "alpha", 40)
    write_task(tmp_path / "d", "beta", 30)
    env = dict(os.environ, RLORA_TOKEN_CACHE=str(cache_dir), PYTHONPATH=str(REPO))
    gate = tmp_path / "gate"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(default_model_dir()), str(tmp_path / "d"), str(gate)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(g["status"] for g in got)[0] == "built" and sorted(g["status"] for g in got)[1] in ("reused", "waited")
    assert got[0]["folder"] == got[1]["folder"] and got[0]["digest"] == got[1]["digest"]
    assert all(g["mapped"] for g in got)  # the rows are read from a memory map of the one file
    assert [p.name for p in cache_dir.iterdir() if p.is_dir()] == [Path(got[0]["folder"]).name]
    ref = reference(smol_tokenizer, DataConfig(path=str(tmp_path / "d"), max_length=64))
    assert got[0]["digest"] == hashlib.sha256(json.dumps(list(ref.values())).encode()).hexdigest()


def test_same_order_batches_and_resume_digest_as_the_in_memory_path(smol_tokenizer, tiny_model_dir, task_dir, tmp_path,
                                                                    cache_dir):
    """6 micro-batches on the cache path, the sampler state saved after 3 and loaded by a fresh setup (the
    cache then reused): the chained slot digest (the loop's ``data_order``) and every batch equal those of
    the in-memory path (rows tokenised into lists, sampler built on their sizes) run straight through."""
    cfg = run_config(tiny_model_dir, task_dir, tmp_path, mlflow__enabled=False, eval__max_examples_per_task=0,
                     sampler__strategy="temperature")
    old_rows = tokenize_tasks(smol_tokenizer, load_tasks(cfg.data, "train"), cfg.data.max_length,
                              cfg.data.use_chat_template, prompt_templates(cfg.data))
    names = list(old_rows)
    old_sampler = build_sampler(cfg, [len(old_rows[n]) for n in names], names, 1, 2)

    def run(sampler, rows, k, digest=""):
        batches = []
        for _ in range(k):
            slots = sampler.next_batch()
            digest = hashlib.sha256((digest + repr(slots)).encode()).hexdigest()
            batches.append(left_padded_batch([rows[names[t]][i] for t, i in slots], 0, [t for t, _ in slots]))
        return batches, digest

    ref_batches, ref_digest = run(old_sampler, old_rows, 6)
    first = load_train_data(cfg, smol_tokenizer, 1, 2)
    assert first.names == names and "built" in first.cache_note
    head, digest = run(first.sampler, first.tokenized, 3)
    state = json.loads(json.dumps(first.sampler.state_dict()))
    del first  # "killed"
    second = load_train_data(cfg, smol_tokenizer, 1, 2)
    assert "reused" in second.cache_note
    second.sampler.load_state_dict(state)
    tail, digest = run(second.sampler, second.tokenized, 3, digest)
    assert digest == ref_digest
    for got, want in zip(head + tail, ref_batches):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) if torch.is_tensor(want[k]) else got[k] == want[k]
                                                 for k in want)
