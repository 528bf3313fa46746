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
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["method"] == method and meta["tasks"] == TASKS and meta["r"] == 8
    assert meta["base_model"] == "tiny-llama"  # the base model's name or path is recorded
    fresh = rlora.load_adapter(tiny_llama(), out)
    with rlora.task_ids([0, 1, 2]):
        assert torch.equal(fresh(ids).logits, ref)


def test_rlora_offset_is_saved(tmp_path):
    model = rlora.inject(tiny_llama(), rlora.AdapterConfig(method="rlora"))
    rlora.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
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
    w = tmp_path / "a" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AdapterError, match="truncated or corrupted"):
        rlora.load_adapter(tiny_llama(), tmp_path / "a")


def test_pickle_adapters_are_refused(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({}, d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only safetensors"):
        rlora.load_adapter(tiny_llama(), d)
