"""save_adapter / load_adapter: exact round trip, safetensors only, clear errors."""
import json

import pytest
import torch

import rlora
from rlora.layers import AdapterError
from helpers import tiny_llama
from test_inject import TASKS, perturb


@pytest.mark.parametrize("method", ["lora", "hydra", "rlora", "mtl"])
def test_save_load_round_trips_logits_exactly(tmp_path, method):
    base = tiny_llama()
    base.config._name_or_path = "tiny-llama"
    model = perturb(rlora.inject(base, rlora.AdapterConfig(method=method, tasks=TASKS)))
    ids = torch.randint(0, 128, (3, 6))
    with rlora.task_ids([0, 1, 2]):
        ref = model(ids).logits
    out = tmp_path / "adapter"
    out.mkdir()  # an existing empty directory is accepted
    rlora.save_adapter(model, out)
    meta = json.loads((out / "rlora_adapter.json").read_text())
    assert meta["method"] == method and meta["tasks"] == TASKS and meta["r"] == 8
    assert meta["base_model"] == "tiny-llama"  # the base model's name or path is recorded
    fresh = rlora.load_adapter(tiny_llama(), out)
    with rlora.task_ids([0, 1, 2]):
        assert torch.equal(fresh(ids).logits, ref)


def test_rlora_offset_is_saved(tmp_path):
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method="rlora"))
    rlora.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "a" / "rlora_adapter.safetensors")).keys()
    assert any(k.endswith("offset_A") for k in keys) and any(k.endswith("offset_B") for k in keys)


def test_save_refuses_non_empty_dir(tmp_path):
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig())
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("1")
    with pytest.raises(AdapterError, match="not an empty directory"):
        rlora.save_adapter(model, tmp_path / "x")


def test_load_errors(tmp_path):
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method="lora"))
    rlora.save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="does not exist"):
        rlora.load_adapter(tiny_llama(), tmp_path / "missing")
    # another base model: shapes differ, the tensor is named
    with pytest.raises(AdapterError, match=r"tensor .*lora_A has shape .* another base model"):
        rlora.load_adapter(tiny_llama(hidden=32), tmp_path / "a")
    # truncated weights
    w = tmp_path / "a" / "rlora_adapter.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AdapterError, match="truncated or corrupted"):
        rlora.load_adapter(tiny_llama(), tmp_path / "a")


def test_files_are_not_named_like_peft_and_legacy_folders_still_load(tmp_path):
    """rlora's own file names, so PEFT/vLLM/SGLang find no adapter_config.json to half-read; a folder saved
    under PEFT's names before (format rlora-adapter) loads to the same logits, and a real PEFT folder is named."""
    model = perturb(rlora.inject(tiny_llama(), rlora.AdapterConfig(method="rlora", tasks=TASKS)))
    rlora.save_adapter(model, tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["rlora_adapter.json", "rlora_adapter.safetensors"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (tmp_path / "new" / "rlora_adapter.json").rename(legacy / "adapter_config.json")
    (tmp_path / "new" / "rlora_adapter.safetensors").rename(legacy / "adapter_model.safetensors")
    ids = torch.randint(0, 128, (3, 6))
    with rlora.task_ids([0, 1, 2]):
        assert torch.equal(rlora.load_adapter(tiny_llama(), legacy)(ids).logits, model(ids).logits)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (peft_dir / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="PEFT adapter .*load it with peft"):
        rlora.load_adapter(tiny_llama(), peft_dir)


def test_pickle_adapters_are_refused(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({}, d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only safetensors"):
        rlora.load_adapter(tiny_llama(), d)


# every config field that changes what a loaded adapter computes: (field, method, saved, in the model)
MISMATCHES = [
    ("method", "lora", {}, {"method": "hydra"}),
    ("r", "lora", {"r": 8}, {"r": 4}),
    ("num_heads", "hydra", {"num_heads": 3}, {"num_heads": 2}),
    ("tasks", "mtl", {"tasks": TASKS}, {"tasks": list(reversed(TASKS))}),
    ("alpha", "lora", {"alpha": 16.0}, {"alpha": 8.0}),
    ("rslora", "lora", {"rslora": False}, {"rslora": True}),
    ("temperature", "mtl", {"temperature": 0.1}, {"temperature": 0.5}),
    ("diagonal", "mtl", {"diagonal": False}, {"diagonal": True}),
    ("target_modules", "lora", {"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ["q_proj"]}),
    ("zero_start_offset", "rlora", {"zero_start_offset": True}, {"zero_start_offset": False}),
    ("base_model", "lora", {"base_model": "org/model-a"}, {"base_model": "org/model-b"}),
]


def _values(field, kw, method):
    return kw.get(field, method if field == "method" else None)


@pytest.mark.parametrize("field,method,saved,model_kw", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_load_into_injected_model_refuses_each_output_changing_mismatch(tmp_path, field, method, saved, model_kw):
    base = {"method": method, "tasks": TASKS, "target_modules": ["q_proj", "v_proj"]}
    rlora.save_adapter(rlora.inject(tiny_llama(), rlora.AdapterConfig(**{**base, **saved})), tmp_path / "a")
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(**{**base, **model_kw}))
    with pytest.raises(AdapterError) as err:
        rlora.load_adapter(model, tmp_path / "a")
    msg = str(err.value)
    want, have = _values(field, saved, method), _values(field, model_kw, method)
    assert "\n" not in msg and f"{field} is {want!r} in {tmp_path / 'a'}" in msg and f"{have!r} in the model" in msg


def test_settings_that_only_shape_init_or_training_do_not_block_loading(tmp_path):
    """gamma only scales the initial A and B (and so the R-LoRA offset), all of which are loaded from
    the file; dropout is training noise. Neither changes what the loaded adapter computes in eval."""
    saved = perturb(rlora.inject(tiny_llama(), rlora.AdapterConfig(method="rlora", gamma=64, dropout=0.05)))
    rlora.save_adapter(saved, tmp_path / "a")
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method="rlora", gamma=4, dropout=0.3))
    rlora.load_adapter(model, tmp_path / "a")
    ids = torch.randint(0, 128, (2, 6))
    assert torch.equal(model(ids).logits, saved(ids).logits)


def test_heads_and_mtl_settings_are_not_compared_where_they_do_not_apply(tmp_path):
    """lora builds one head whatever num_heads says; temperature and diagonal are MTL-LoRA settings."""
    rlora.save_adapter(rlora.inject(tiny_llama(), rlora.AdapterConfig(method="lora", num_heads=3)), tmp_path / "a")
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method="lora", num_heads=5, temperature=2.0, diagonal=True))
    rlora.load_adapter(model, tmp_path / "a")
