"""Exports against vLLM's and SGLang's loading rules (rlora/export/serving_rules.py): every format of every
method passes them, each rule catches the config or tensor it is about, and `rlora export` prints the
serving commands and one warning line per rejection."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import rlora
from rlora.export import export
from rlora.export.api import REPORT_NAME
from rlora.export.serving_rules import (TENSOR_KEY, VLLM_MAX_LORA_RANKS, check_merged_dir, check_peft_dir,
                                        engine_scaling, serving_commands, smallest_vllm_rank, tensor_shapes)


METHODS = ("lora", "mtl", "hydra", "rlora")


def _base_config(base_dir) -> dict:
    return json.loads((base_dir / "config.json").read_text())


def _export(adapter, method, fmt, data_dir, out):
    routed = method in ("hydra", "rlora")
    return export(adapter, task=None if method == "lora" else "beta", format=fmt, out=out,
                  data=data_dir if routed else None, max_examples=2)


@pytest.mark.parametrize("method", METHODS)
def test_peft_export_of_every_method_passes_both_engines(method, adapters, base_dir, data_dir, tmp_path):
    out = _export(adapters[method], method, "peft", data_dir, tmp_path / "peft")
    assert check_peft_dir(out, _base_config(base_dir)) == []
    cfg = json.loads((out / "adapter_config.json").read_text())
    r = cfg["r"]
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False and cfg["bias"] == "none"
    assert cfg["modules_to_save"] is None and cfg["use_dora"] is False
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # tensor keys and ranks as both engines parse them
    shapes = tensor_shapes(out)
    assert len(shapes) == 2 * 2 * 7                                    # A and B, 2 layers x 7 modules
    for key, shape in shapes.items():
        m = TENSOR_KEY.match(key)
        assert m is not None, key
        assert (shape[0] if m["which"] == "A" else shape[1]) == r
    # rank: R-LoRA's net update at most 2r (= 8 here), the others r; vLLM's --max-lora-rank holds it
    assert r == (8 if method == "rlora" else 4)
    assert smallest_vllm_rank(r) == 8 and smallest_vllm_rank(r) in VLLM_MAX_LORA_RANKS
    # scaling: PEFT, vLLM and SGLang compute the same factor, the adapter's own alpha / r
    scalings = {e: engine_scaling(cfg, e) for e in ("peft", "vllm", "sglang")}
    assert scalings["peft"] == scalings["vllm"] == scalings["sglang"] == pytest.approx(8.0 / 4)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["serving"]["findings"] == []
    assert f"--max-lora-rank 8 --max-loras 1 --lora-modules {'beta' if method != 'lora' else 'adapter'}={out}" \
        in report["serving"]["vllm"]
    assert report["serving"]["vllm"].startswith(f"vllm serve {base_dir} --enable-lora ")
    assert "--max-loras-per-batch 2 --lora-paths" in report["serving"]["sglang"]


@pytest.mark.parametrize("method", METHODS)
def test_merged_export_of_every_method_is_a_plain_servable_model(method, adapters, data_dir, tmp_path):
    out = _export(adapters[method], method, "merged", data_dir, tmp_path / "merged")
    assert check_merged_dir(out) == []
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["serving"] == {"vllm": f"vllm serve {out}", "sglang": f"python -m sglang.launch_server "
                                 f"--model-path {out}", "findings": [], "base_model_note": report["serving"]["base_model_note"]}
    assert not check_peft_dir(out) == []                                # and it is no LoRA adapter


@pytest.mark.parametrize("method", METHODS)
def test_multihead_export_is_refused_by_both_engines_and_reloads_in_rlora(method, adapters, base_dir, tmp_path):
    out = export(adapters[method], format="multihead", out=tmp_path / "mh")
    assert not (out / "adapter_config.json").exists()                  # vLLM/PEFT/SGLang find no LoRA config
    findings = check_peft_dir(out)
    assert {f.engine for f in findings} == {"vllm", "sglang"} and {f.kind for f in findings} == {"reject"}
    assert all("rlora's multi-head adapter" in f.line() and "--format peft" in f.line() for f in findings)
    assert rlora.load_adapter(rlora.load_base_model(str(base_dir)), out).rlora_config.method == method


def test_rslora_scale_is_folded_into_lora_alpha(base_dir, tmp_path):
    """SGLang ignores use_rslora: the export writes use_rslora false and lora_alpha = (alpha / sqrt r) * r."""
    model = rlora.load_base_model(str(base_dir))
    rlora.inject(model, rlora.AdapterConfig(method="lora", r=4, alpha=8.0, rslora=True, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    out = export(rlora.save_adapter(model, tmp_path / "a"), format="peft", out=tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == pytest.approx(8.0 / math.sqrt(4) * 4)
    assert [engine_scaling(cfg, e) for e in ("peft", "vllm", "sglang")] == [pytest.approx(8.0 / 2)] * 3
    assert check_peft_dir(out, _base_config(base_dir)) == []


# ----------------------------------------------------------------------------------------------
# each rule catches what it is about (a valid export, doctored)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_peft(adapters, tmp_path_factory):
    return export(adapters["lora"], format="peft", out=tmp_path_factory.mktemp("valid") / "peft")


def _doctor(src, dst, config=None, drop=(), tensors=None):
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        for k in drop:
            cfg.pop(k)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        from safetensors.torch import load_file, save_file

        save_file(tensors(load_file(str(dst / "adapter_model.safetensors"))), str(dst / "adapter_model.safetensors"))
    return dst


def _rename_first(state, old, new):
    key = next(k for k in state if old in k)
    return {(k.replace(old, new) if k == key else k): v for k, v in state.items()}


CASES = {
    # name: (config update, keys to drop, tensor edit, {(engine, kind, field fragment)}, max_lora_rank)
    "missing lora_alpha": ({}, ("lora_alpha",), None, {("vllm", "reject", "lora_alpha"), ("sglang", "reject", "lora_alpha")}, None),
    "rank over 512": ({"r": 640}, (), None, {("vllm", "reject", "r"), ("vllm", "reject", "tensor"),
                                            ("sglang", "reject", "tensor")}, None),   # and the tensors are rank 4
    "rank over --max-lora-rank": ({}, (), None, {("vllm", "reject", "r")}, 1),
    "max-lora-rank not allowed": ({}, (), None, {("vllm", "reject", "--max-lora-rank")}, 24),
    "bias": ({"bias": "all"}, (), None, {("vllm", "reject", "bias"), ("sglang", "differs", "bias")}, None),
    "dora": ({"use_dora": True}, (), None, {("vllm", "reject", "use_dora"), ("sglang", "reject", "use_dora")}, None),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, (), None,
                        {("vllm", "reject", "modules_to_save"), ("sglang", "differs", "modules_to_save")}, None),
    "rslora": ({"use_rslora": True}, (), None, {("sglang", "differs", "use_rslora")}, None),
    "peft_type": ({"peft_type": "LOHA"}, (), None, {("sglang", "reject", "peft_type")}, None),
    "pissa init": ({"init_lora_weights": "pissa"}, (), None, {("vllm", "reject", "init_lora_weights")}, None),
    "target_modules string": ({"target_modules": "q_proj"}, (), None, {("sglang", "reject", "target_modules")}, None),
    "tensor key": (None, (), lambda s: _rename_first(s, "lora_A.weight", "lora_A.default.weight"),
                   {("vllm", "reject", "tensor"), ("sglang", "differs", "tensor"),
                    ("sglang", "reject", "tensor")}, None),                      # and lora_B lost its pair
    "unsupported module": (None, (), lambda s: {k.replace("q_proj", "rotary_proj"): v for k, v in s.items()},
                           {("vllm", "reject", "tensor"), ("sglang", "reject", "tensor"),
                            ("sglang", "differs", "v_proj")}, None),                  # k/v left without q_proj
    "rank mismatch": (None, (), lambda s: {k: (v[:2] if k.endswith("o_proj.lora_A.weight") else v) for k, v in s.items()},
                      {("vllm", "reject", "tensor"), ("sglang", "reject", "tensor")}, None),
    "q without v": (None, (), lambda s: {k: v for k, v in s.items() if "v_proj" not in k},
                    {("sglang", "reject", "q_proj")}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_names_what_the_engine_rejects(case, valid_peft, base_dir, tmp_path):
    config, drop, tensors, want, max_rank = CASES[case]
    folder = _doctor(valid_peft, tmp_path / "x", config if config is not None or drop else None, drop, tensors)
    got = check_peft_dir(folder, _base_config(base_dir), max_lora_rank=max_rank)
    assert {(f.engine, f.kind) for f in got} == {(e, k) for e, k, _ in want}, [f.line() for f in got]
    for e, k, field in want:
        assert any(f.engine == e and f.kind == k and field in f.field for f in got), [f.line() for f in got]
    for f in got:                                                        # one line each, naming the folder
        assert "\n" not in f.line(folder) and str(folder) in f.line(folder)


def test_serving_commands_fit_the_rank_and_the_number_of_adapters():
    cmds = serving_commands("/m/base", {"qa": "/x/qa", "math": "/x/math", "nli": "/x/nli"}, 17)
    assert cmds["vllm"] == ("vllm serve /m/base --enable-lora --max-lora-rank 32 --max-loras 3 "
                            "--lora-modules qa=/x/qa math=/x/math nli=/x/nli")
    assert cmds["sglang"] == ("python -m sglang.launch_server --model-path /m/base --enable-lora --max-lora-rank 17 "
                              "--max-loras-per-batch 4 --lora-paths qa=/x/qa math=/x/math nli=/x/nli")
    assert [smallest_vllm_rank(r) for r in (1, 2, 16, 300, 321, 512, 513)] == [1, 8, 16, 320, 512, 512, None]


@pytest.mark.slow
def test_cli_prints_the_commands_and_one_warning_per_rejection(base_dir, tmp_path):
    """An adapter of rank 520 on k_proj only: vLLM refuses the rank (above 512), SGLang skips k_proj without q_proj;
    the export is still written (PEFT loads it) and each engine's problem is one line. A real process, so that
    transformers' "Loading weights" progress bars reach file descriptor 2: they go to the log, not the console."""
    import os
    import subprocess
    import sys

    model = rlora.load_base_model(str(base_dir))
    rlora.inject(model, rlora.AdapterConfig(method="lora", r=520, alpha=520.0, target_modules=["k_proj"], dropout=0.0))
    adapter = rlora.save_adapter(model, tmp_path / "a")
    env = dict(os.environ, RLORA_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "rlora.cli", "export", str(adapter), "--format", "peft", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    warnings = [l for l in lines if l.startswith("[rlora] warning: ")]
    assert len(warnings) == 3, lines                                    # rank (vLLM); k_proj of 2 layers (SGLang)
    assert warnings[0] == (f"[rlora] warning: vLLM would reject {tmp_path / 'o'}: r: rank 520 is greater than "
                           "max_lora_rank 512 (the largest vLLM accepts)")
    assert all("SGLang would compute another update" in w and "k_proj" in w for w in warnings[1:])
    assert any(l.startswith(f"[rlora] serve with vLLM:   vllm serve {base_dir} --enable-lora") for l in lines)
    assert any(l.startswith("[rlora] serve with SGLang: python -m sglang.launch_server") for l in lines)
    assert "Loading weights" not in proc.stdout + proc.stderr          # progress bars went to the log
    log = next(l for l in lines if l.startswith("[rlora] library output: ")).split(": ", 1)[1]
    assert log.startswith(str(tmp_path / "cache" / "logs" / "export-")) and "Loading weights" in open(log).read()
