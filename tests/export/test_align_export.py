"""Align-LoRA exports exactly as a plain PEFT LoRA: the same files as LoRA's export of the same weights, loaded by
PEFT as a LoRA adapter, with the logits of rlora's own forward."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import rlora
from rlora.export import export
from rlora.export.api import REPORT_NAME

from .conftest import TASKS, adapter_logits, sample_ids

TOL = 1e-4


def _saved(base_dir, method, out):
    """``method``'s adapter with the same (perturbed) weights for lora and align: same seed, same injection."""
    model = rlora.load_base_model(str(base_dir))
    torch.manual_seed(0)
    rlora.inject(model, rlora.AdapterConfig(method=method, r=4, alpha=8.0, dropout=0.0, tasks=list(TASKS)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return rlora.save_adapter(model, out)


def test_align_exports_as_the_plain_peft_lora_of_its_weights(base_dir, tmp_path):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from rlora.models import load_tokenizer

    align = _saved(base_dir, "align", tmp_path / "align")
    lora = _saved(base_dir, "lora", tmp_path / "lora")
    out_a = export(align, format="peft", out=tmp_path / "peft-align")       # no --task: one update for all tasks
    out_l = export(lora, format="peft", out=tmp_path / "peft-lora")
    wa, wl = load_file(str(out_a / "adapter_model.safetensors")), load_file(str(out_l / "adapter_model.safetensors"))
    assert wa.keys() == wl.keys() and wa and all(torch.equal(wa[k], wl[k]) for k in wa)
    assert (json.loads((out_a / "adapter_config.json").read_text())
            == json.loads((out_l / "adapter_config.json").read_text()))
    report = json.loads((out_a / REPORT_NAME).read_text())
    assert report["method"] == "align" and report["exact"] is True and report["rank"] == 4

    ids, mask = sample_ids(load_tokenizer(str(base_dir)))
    want = adapter_logits(base_dir, align, None, ids, mask)                   # rlora's forward (eval)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
    peft_model = PeftModel.from_pretrained(base, str(out_a)).eval()
    assert isinstance(peft_model.peft_config["default"], LoraConfig)
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (want - plain).abs().max() > 1e-2                 # the adapter changes the model: a real check
    assert (got - want).abs().max() <= TOL
