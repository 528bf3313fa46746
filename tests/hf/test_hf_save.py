"""`save_pretrained` / `Trainer.save_model` write only the adapter (rlora's format, with a fingerprint of the
base weights); `AdapterModel.from_pretrained` restores it onto the same base and refuses another one."""
import json

import pytest
import torch

import rlora
from hf_helpers import METHODS, MIXED, adapter_model
from helpers import tiny_llama
from rlora.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from rlora.hf import base_fingerprint


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, task_ids=MIXED).logits


@pytest.mark.parametrize("method", METHODS)
def test_save_pretrained_writes_only_the_adapter_and_reloads(method, tokens, tmp_path):
    model = adapter_model(method).eval()
    (tmp_path / "README.md").write_text("kept")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["README.md", CONFIG_NAME, WEIGHTS_NAME])
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format"] == "rlora-adapter" and meta["base_fingerprint"] == base_fingerprint(tiny_llama())
    loaded = rlora.AdapterModel.from_pretrained(tiny_llama(), tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))
    old_api = rlora.load_adapter(tiny_llama(), tmp_path)  # the old API reads the same folder
    with rlora.task_ids(MIXED), torch.no_grad():
        assert torch.equal(old_api(tokens).logits, _logits(model, tokens))


@pytest.mark.parametrize("method", METHODS)
def test_another_base_is_refused_and_transformers_does_not_load_it_silently(method, tmp_path):
    adapter_model(method).save_pretrained(tmp_path)
    other = tiny_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight[0, 0] += 1e-3  # one weight differs, names and shapes do not
    with pytest.raises(rlora.AdapterError, match="trained on other base weights.*same dtype"):
        rlora.AdapterModel.from_pretrained(other, tmp_path)
    with pytest.raises(rlora.AdapterError, match="trained on other base weights"):
        rlora.AdapterModel.from_pretrained(tiny_llama().to(torch.float64), tmp_path)
    from transformers import AutoModelForCausalLM

    # no model config and no model weights: transformers refuses the folder (which error depends on the adapter
    # file names: PEFT's names send it down its PEFT path) instead of returning a partly random model
    with pytest.raises((OSError, ValueError, KeyError)):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_fingerprint_is_the_base_models_before_after_inject_and_while_merged():
    plain = base_fingerprint(tiny_llama())
    model = adapter_model("lora")
    assert base_fingerprint(model) == plain
    rlora.merge(model.get_base_model())
    assert base_fingerprint(model) == plain
    assert base_fingerprint(tiny_llama().to(torch.bfloat16)) != plain


@pytest.mark.slow  # Trainer start-up
def test_trainer_save_model_writes_the_adapter(tokens, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = adapter_model("mtl")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args)
    trainer.save_model()
    names = {p.name for p in tmp_path.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME} <= names
    assert not {"model.safetensors", "config.json"} & names
    loaded = rlora.AdapterModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(_logits(loaded, tokens), _logits(model.eval(), tokens))
