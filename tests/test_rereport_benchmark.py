"""benchmarks/rereport.py: a comparison's report rebuilt from stored cell records, training nothing."""
import json

import pytest

from compare.grid import grid
from helpers import load_benchmark

from rlora.compare import markdown_table, summarize


def test_the_report_is_the_one_rlora_compare_writes_from_those_cells(tmp_path):
    cells = grid({"lora": 0.5, "mtl": 0.6}, samplers=("proportional",), seed=3)
    for k, c in enumerate(reversed(cells)):          # stored in no particular order
        (tmp_path / "cells").mkdir(exist_ok=True)
        record = {**c, "rank": 14 if c["method"] == "lora" else 8, "data_order": f"order-{c['seed']}",
                  "row_ids": {t: [f"{t}-{i}" for i in range(len(v))] for t, v in c["correct"].items()}}
        (tmp_path / "cells" / f"{k:02d}.json").write_text(json.dumps(record))
    summary = load_benchmark("rereport").main([str(tmp_path / "cells"), str(tmp_path / "out" / "rep"), "--seed", "7",
                                               "--n-boot", "300"])
    expected = summarize(sorted(cells, key=lambda c: (c["method"] != "lora", c["seed"])), "lora", n_boot=300, seed=7)
    assert summary["comparisons"][0]["mean"] == expected["comparisons"][0]["mean"]
    text = (tmp_path / "out" / "rep.md").read_text()
    rows = lambda md: [line for line in md.splitlines() if line.startswith(("| lora", "| mtl"))]  # noqa: E731
    assert rows(text) == rows(markdown_table(expected)) and len(rows(text)) == 4     # 2 arms, 2 statistics
    assert "**Budget** `ab`: LoRA rank 14" in text
    assert json.loads((tmp_path / "out" / "rep.json").read_text())["rng_seed"] == 7
    assert (tmp_path / "out" / "rep_forest.png").read_bytes()[:4] == b"\x89PNG"


def test_errors_name_the_folder_and_the_fix(tmp_path):
    bench = load_benchmark("rereport")
    with pytest.raises(SystemExit, match="no cell records"):
        bench.main([str(tmp_path), str(tmp_path / "rep")])
    (tmp_path / "c.json").write_text(json.dumps(grid({"lora": 0.5, "dora": 0.6}, samplers=("proportional",))[-1]))
    with pytest.raises(SystemExit, match=r"cells of \['dora'\] .* add them to --methods"):
        bench.main([str(tmp_path), str(tmp_path / "rep")])
