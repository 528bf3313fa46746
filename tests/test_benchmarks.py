"""The speed and memory benchmarks' mechanics on tiny random models: the rounds/spread helpers, the
equal-work training sides, the memory accounting and the GPU check's --dry-run on CPU
(benchmarks/quality.py: tests/test_quality_benchmark.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_figure_is_median_and_half_range_of_rounds():
    from _common import figure, ratios

    f = figure(ratios([1.2, 1.0, 1.5], [1.0, 1.0, 1.0]), "<=1.2")
    assert f == {"value": 1.2, "spread": 0.25, "target": "<=1.2", "unit": "x", "rounds": 3}
    # one number: spread unknown unless given (0 for an exact figure)
    assert figure(3e-7, "info", "rel")["spread"] is None and figure(3e-7, "info", "rel")["value"] == 3e-7
    assert figure(0.5, "info", spread=0.0)["spread"] == 0.0
    with pytest.raises(ValueError, match="same rounds"):
        ratios([1.0], [1.0, 2.0])


def test_meets_reads_the_target_strings():
    from _common import meets

    assert meets(1.2, "<=1.2") and not meets(1.21, "<=1.2")
    assert meets(0.9, ">=0.9") and not meets(1.0, "<1") and meets(1.0, "==1")
    assert meets(5.0, "info") is None


class FakeClock:
    """A ``time.perf_counter`` that only the contenders advance: each call of a contender adds its
    scripted duration, so every timing the benchmark code makes has a known answer."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def contender(self, durations):
        it = iter(durations)

        def fn():
            self.now += next(it)
        return fn


def test_rounds_ratio_and_spread_of_scripted_durations_are_exact(monkeypatch):
    """Through the benchmarks' own timing, ratio and summary code: b takes 2, 3, 2.5 times as long as a in
    the three rounds (the median of 3 calls each; one call per round, at another place in each round, is an
    outlier the median drops), so the figure is the median ratio 2.5 with half-range spread 0.5, exactly.
    Timing b from the start of the round (including a's call) would give 3.5 +- 4.5, keeping each round's
    first call 3 +- 1, a ratio the other way 0.4."""
    import _common

    clock = FakeClock()
    monkeypatch.setattr(_common.time, "perf_counter", clock)
    a = [1.0] + [1.0, 9.0, 1.0, 9.0, 1.0, 1.0, 1.0, 1.0, 9.0]  # warm-up call, then 3 rounds of 3 calls
    b = [5.0] + [2.0, 2.0, 0.1, 3.0, 3.0, 50.0, 2.5, 0.2, 2.5]
    rounds = _common.interleaved_rounds({"a": clock.contender(a), "b": clock.contender(b)}, rounds=3,
                                        per_round=3, warmup=1)
    assert rounds == {"a": [1.0, 1.0, 1.0], "b": [2.0, 3.0, 2.5]}
    f = _common.figure(_common.ratios(rounds["b"], rounds["a"]), "<=2")
    assert f == {"value": 2.5, "spread": 0.5, "target": "<=2", "unit": "x", "rounds": 3}
    assert _common.meets(f["value"], f["target"]) is False
    assert _common.show(_common.ratios(rounds["b"], rounds["a"]), ".2f") == "2.50x ± 0.50 (3 rounds)"


def test_a_contender_that_sleeps_twice_as_long_measures_a_ratio_of_two():
    """On the real clock: 60 ms against 30 ms of sleep. A sleep overshoots by the wake-up delay e (~0.1 ms
    on an idle machine, a few ms on a busy one): (60 + e) / (30 + e) is 1.88 for e = 4 ms; allowed 2 +- 0.25
    for the figure, the median over rounds of the median over calls, which drops a rare long delay."""
    import time

    from _common import figure, interleaved_rounds, ratios

    out = interleaved_rounds({"short": lambda: time.sleep(0.03), "long": lambda: time.sleep(0.06)}, rounds=3,
                             per_round=3, warmup=1)
    f = figure(ratios(out["long"], out["short"]), "info")
    assert f["value"] == pytest.approx(2.0, abs=0.25) and f["rounds"] == 3, (f, out)
    assert min(out["short"]) >= 0.03 and min(out["long"]) >= 0.06


def test_peak_rss_sees_a_known_allocation():
    """A fresh process touches 256 MiB (a bytearray written byte by byte); the benchmarks' peak RSS
    (VmHWM, KiB) must rise to the resident size before it plus 256 MiB, within 4 MiB (the
    interpreter's own allocations around it; a KiB read as 1000 bytes would be 6 MiB short)."""
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
            "import os, json\n"
            "from _e2e import peak_rss_bytes\n"
            "page = os.sysconf('SC_PAGE_SIZE')\n"
            "resident = lambda: int(open('/proc/self/statm').read().split()[1]) * page\n"
            "before, peak0 = resident(), peak_rss_bytes()\n"
            "block = bytearray(b'x') * (256 << 20)\n"
            "print(json.dumps([before, peak0, peak_rss_bytes()]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, peak0, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peak0 < before + (256 << 20)  # the allocation sets the new peak
    assert abs(peak - before - (256 << 20)) <= 4 << 20, (peak - before) / 2 ** 20


def test_interleaved_rounds_alternate_the_contenders():
    from _common import interleaved_rounds

    calls = []
    out = interleaved_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3,
                             per_round=2, warmup=1)
    assert calls == ["a", "b"] * (1 + 3 * 2)  # warm-up, then a b a b ... never a a
    assert set(out) == {"a", "b"} and all(len(v) == 3 and min(v) >= 0 for v in out.values())


@pytest.mark.slow
def test_equal_work_sides_train_on_the_same_rows(tiny_model_dir, tmp_path):
    """rlora (full LM head) and HF Trainer + PEFT see the same rows in the same order; the full head asks the
    model for the logits of every position; the patch is undone afterwards."""
    import rlora.train.batches as batches
    from _e2e import observed_batches, run_config, run_peer, run_rlora

    cfg = run_config(3, str(tmp_path), stage=0, model=str(tiny_model_dir), batch=2, max_length=48, rows_per_task=10)
    original = batches.left_padded_batch
    full = run_rlora(cfg, full_lm_head=True)
    assert batches.left_padded_batch is original
    peer = run_peer(cfg)
    assert len(full["rows"]) == 3 and full["rows"] == peer["rows"]
    assert full["tokens_per_s"] > 0 and peer["tokens_per_s"] > 0
    assert full["trainable"] == peer["trainable"]  # the same LoRA: r, targets, A and B
    feats = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [5, 9], "labels": [-100, 9]}]
    with observed_batches(False) as seen:
        shipped = batches.left_padded_batch(feats, 0, [0, 0])
    with observed_batches(True):
        every = batches.left_padded_batch(feats, 0, [0, 0])
    assert seen == [[(5, 6, 7, 8), (5, 9)]] and shipped["keep"] == 3 and every["keep"] == 4


@pytest.mark.slow
def test_held_bytes_counts_parameters_and_adam_state(tiny_model_dir, tmp_path):
    from _e2e import held_bytes, run_config

    from rlora.train.loop import Trainer
    from rlora.train.runtime import LocalRuntime

    cfg = run_config(1, str(tmp_path), stage=0, model=str(tiny_model_dir), batch=2, max_length=32, rows_per_task=4)
    trainer = Trainer(cfg, LocalRuntime(None), {"run_name": "t", "started_at": 0.0}, progress=False)
    trainer.fit()
    held = held_bytes(trainer.engine)
    params = list(trainer.engine.module.parameters())
    assert held["params"] == sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    assert held["optimizer"] >= 2 * 4 * trainable  # AdamW's two fp32 moments at least


def test_random_model_has_the_shape_and_the_tokenizer_vocab(tmp_path):
    from transformers import AutoConfig

    from _e2e import QWEN_SHAPES, random_model
    from rlora.models import load_tokenizer

    folder, n = random_model(tmp_path / "m", "tiny")
    c = AutoConfig.from_pretrained(folder)
    assert c.model_type == "qwen2" and c.vocab_size == len(load_tokenizer("smollm2-135m"))
    assert all(getattr(c, k) == v for k, v in QWEN_SHAPES["tiny"].items())
    d, L, f = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    kv = c.num_key_value_heads * d // c.num_attention_heads
    per_layer = 2 * d * d + 2 * d * kv + 2 * kv + d + 3 * d * f + 2 * d  # q/o, k/v (+ q/k/v biases), MLP, norms
    assert n == c.vocab_size * d + L * per_layer + d  # tied embeddings, final norm
    assert random_model(folder, "tiny") == (folder, n)  # reused, not rewritten


@pytest.mark.slow
def test_train_throughput_runs_equal_work_and_reports_spread(tiny_model_dir, capsys):
    import train_throughput

    figs = train_throughput.main(["--steps", "2", "--rounds", "2", "--no-ray", "--json", "--model",
                                  str(tiny_model_dir)])
    assert figs["same_rows_same_order"]["value"] == 1.0
    for name in ("rlora_vs_hf_peft_equal_work", "answer_only_lm_head_gain"):
        assert figs[name]["rounds"] == 2 and figs[name]["value"] > 0 and figs[name]["spread"] >= 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["benchmark"] == "train_throughput" and last["figures"] == figs


@pytest.mark.slow
def test_memory_process_part_reports_peak_rss(tiny_model_dir):
    import memory

    figs = memory.main(["--no-zero", "--rounds", "1", "--steps", "2", "--model", str(tiny_model_dir)])
    assert 0.2 < figs["hf_peft_peak_rss_gib"]["value"] < 8 and figs["rlora_vs_hf_peft_peak_rss"]["value"] > 0
    assert figs["rlora_vs_hf_peft_peak_rss"]["target"] == "<=1.0"


@pytest.mark.slow
def test_gpu_check_dry_run_prints_one_json_line_per_figure():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.strip().splitlines()]
    assert not [x for x in lines if "error" in x]
    assert {x["check"] for x in lines} == {"layer_overhead", "mixed_batch", "e2e"}
    assert all({"figure", "value", "spread", "target", "unit"} <= set(x) for x in lines)
    e2e = {x["figure"]: x for x in lines if x["check"] == "e2e"}
    for model in ("embedded", "qwen1.5b"):
        for fig in ("rlora_vs_hf_peft", "rlora_tokens_per_s", "hf_peft_tokens_per_s", "rlora_mfu",
                    "rlora_peak_mem_gib", "hf_peft_peak_mem_gib"):
            assert e2e[f"{model}_{fig}"]["value"] > 0
        assert e2e[f"{model}_rlora_vs_hf_peft"]["backend"] == "gloo"
    layer = {x["figure"] for x in lines if x["check"] == "layer_overhead"}
    assert {"lora_vs_base", "hydra_vs_base", "rlora_vs_base", "mtl_vs_base"} <= layer


@pytest.mark.slow
def test_demo_steps_trains_each_cell_once_and_reports_paired_intervals(tiny_model_dir, tmp_path, capsys):
    import demo_steps

    args = ["--steps", "1,2", "--seeds", "3", "--out", str(tmp_path), "--local", "--n-boot", "200", "--json",
            f"model.name_or_path={tiny_model_dir}", "eval.max_examples_per_task=3", "diagnostics.enabled=false",
            "mlflow.enabled=false", "eval.before_training=false"]
    figs = demo_steps.main(args)
    cells = sorted(p.name for p in (tmp_path / "cells").iterdir())
    assert cells == ["steps1-seed3.json", "steps2-seed3.json"]
    record = json.loads((tmp_path / "cells" / "steps1-seed3.json").read_text())
    assert "trainer.max_steps=1" in record["overrides"] and len(record["correct"]) == 6
    for stat in ("mean", "worst"):
        f = figs[f"steps1_minus_steps2_{stat}_accuracy"]
        assert f["lo"] <= f["value"] <= f["hi"] and f["seeds"] == [3]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["figures"] == figs
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    assert demo_steps.main(args) == figs  # a re-run trains nothing and reports the same
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()} == before
    with pytest.raises(SystemExit, match="use another --out"):
        demo_steps.main([*args, "trainer.learning_rate=0.5"])
