"""What vLLM and SGLang check when they load a LoRA adapter, so an export is checked before it is served,
and the serving commands that fit it.

The rules are read from the engines' own loaders (vLLM 0.34, SGLang 0.5.23):

* vLLM ``lora/peft_helper.py``: ``PEFTHelper.from_dict`` needs ``r``, ``lora_alpha``, ``target_modules``
  ("Missing required configuration fields"); ``_validate_features`` rejects ``modules_to_save`` (other than a
  classifier's ``classifier``/``score``), ``use_dora``, ``lora_bias``, string ``init_lora_weights`` other than
  gaussian/eva/orthogonal/mica/lora_ga, aLoRA, ``layer_replication``, BD-LoRA, QALoRA; ``validate_legal``
  rejects ``bias != "none"`` and ``r > --max-lora-rank``; the scaling is ``lora_alpha / r``
  (``lora_alpha / sqrt(r)`` with ``use_rslora``), folded into B in the LoRA dtype (the model's, e.g. bf16).
* vLLM ``config/lora.py``: ``--max-lora-rank`` ∈ {1, 8, 16, 32, 64, 128, 256, 320, 512}, default 16;
  ``--max-loras`` (default 1) adapters run in one batch.
* vLLM ``lora/lora_model.py`` + ``lora/utils.py``: tensors come from ``adapter_model.safetensors`` (or .bin/.pt)
  and are named ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (anything else: "unsupported
  LoRA weight"); a module whose last name is not one of the model's LoRA-capable linear layers (Llama:
  q/k/v/o_proj, gate/up/down_proj; q/k/v and gate/up are packed as qkv_proj and gate_up_proj) is rejected
  ("expected target modules in ..."); lm_head is wrapped too.
* SGLang ``srt/lora/lora_config.py`` + ``lora.py``: reads ``target_modules``, ``r``, ``lora_alpha`` (KeyError
  without them), asserts ``peft_type == "lora"``, scales by ``lora_alpha / r`` always (no rsLoRA, no
  ``rank_pattern``/``alpha_pattern``), stacks q/k/v from ``q_proj`` (k zero-filled when absent, v needed) and
  gate/up from ``gate_proj`` (a weight that matches no stacked module is skipped with a warning, an error only
  with ``--lora-strict-loading``); ``lora_manager.py`` rejects DoRA and adapters with added tokens
  (``added_tokens.json``); ``mem_pool.py`` rejects ``r > --max-lora-rank`` and target modules outside
  ``--lora-target-modules``; ``target_modules`` must be a list or "all"/"all-linear".

:func:`check_peft_dir` applies these to an exported folder; :func:`serving_commands` writes the commands.
"""
from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
SGLANG_REQUIRED_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules")
VLLM_INIT_OK = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
TENSOR_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")

# The LoRA-capable linear layers (last module name) of the decoder families both engines serve with the
# Llama layout (vLLM: packed_modules_mapping qkv_proj/gate_up_proj of LlamaForCausalLM, Qwen2, Qwen3,
# Mistral; SGLang: SUPPORTED_LORA_TARGET_MODULES and its q/k/v, gate/up stacking).
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
SUPPORTED_MODULES: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": LLAMA_LINEAR,
    "MistralForCausalLM": LLAMA_LINEAR,
    "Qwen2ForCausalLM": LLAMA_LINEAR,
    "Qwen3ForCausalLM": LLAMA_LINEAR,
}
ENGINES = ("vllm", "sglang")
_NAMES = {"vllm": "vLLM", "sglang": "SGLang"}


@dataclass(frozen=True)
class Finding:
    """One thing an engine does with the folder: ``reject`` (it refuses to load it) or ``differs`` (it
    loads it but computes something else than PEFT would)."""

    engine: str
    kind: str
    field: str
    message: str

    def line(self, folder: Optional[Path] = None) -> str:
        where = f" {folder}" if folder is not None else ""
        verb = "would reject" if self.kind == "reject" else "would compute another update from"
        return f"{_NAMES[self.engine]} {verb}{where}: {self.field}: {self.message}"


def smallest_vllm_rank(r: int) -> Optional[int]:
    """The smallest ``--max-lora-rank`` that vLLM accepts and that holds rank ``r`` (None above 512)."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= r), None)


def engine_scaling(config: dict, engine: str) -> float:
    """The factor s in ``W0 x + s·B A x`` that ``engine`` ("peft", "vllm" or "sglang") computes from ``config``."""
    r, alpha = config["r"], config["lora_alpha"]
    if engine in ("peft", "vllm") and config.get("use_rslora"):
        return alpha / math.sqrt(r)
    return alpha / r


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` of ``adapter_model.safetensors`` (read from the header, no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / PEFT_WEIGHTS), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _architecture(base_config: Optional[dict]) -> Optional[str]:
    archs = (base_config or {}).get("architectures") or []
    return archs[0] if archs else None


class _Findings:
    """The findings of one check, for the engines asked about."""

    def __init__(self, engines: Iterable[str]):
        self.engines, self.out = tuple(engines), []

    def add(self, engs: Iterable[str], kind: str, field: str, message: str) -> None:
        self.out += [Finding(e, kind, field, message) for e in engs if e in self.engines]


def check_peft_dir(folder: Path, base_config: Optional[dict] = None, max_lora_rank: Optional[int] = None,
                   sglang_max_lora_rank: Optional[int] = None,
                   engines: Iterable[str] = ENGINES) -> list[Finding]:
    """Everything vLLM and SGLang would reject in (or compute differently from) the PEFT adapter ``folder``.

    ``base_config`` is the base model's ``config.json`` (its ``architectures`` name the supported modules);
    ``max_lora_rank`` is vLLM's ``--max-lora-rank`` (None: any value vLLM accepts, up to 512), and
    ``sglang_max_lora_rank`` SGLang's (None: inferred from the adapters, as SGLang does).

    Phases, each stopping the check where the engines would stop reading: the config file, its required
    fields, the rank, unsupported features, target modules, then the tensors and how SGLang stacks them."""
    folder, found = Path(folder), _Findings(engines)
    cfg = _read_peft_config(folder, found)
    if cfg is None or not _has_required_fields(cfg, found):
        return found.out
    if not _rank_fits(cfg["r"], max_lora_rank, sglang_max_lora_rank, found):
        return found.out
    _check_features(folder, cfg, found)
    arch = _architecture(base_config)
    supported = SUPPORTED_MODULES.get(arch or "")
    _check_target_modules(cfg["target_modules"], supported, arch, found)
    if not (folder / PEFT_WEIGHTS).is_file():
        found.add(ENGINES, "reject", PEFT_WEIGHTS, "missing: the adapter holds no tensors")
        return found.out
    modules = _lora_modules(folder, found)
    _check_module_tensors(modules, cfg["r"], cfg["target_modules"], supported, arch, found)
    _check_stacking(modules, found)
    return found.out


def _read_peft_config(folder: Path, found: _Findings) -> Optional[dict]:
    cfg_path = folder / PEFT_CONFIG
    if not cfg_path.is_file():
        from ..adapter_io import CONFIG_NAME

        if (folder / CONFIG_NAME).is_file():
            msg = (f"it is rlora's multi-head adapter ({CONFIG_NAME}), not a LoRA adapter: export one task with "
                   "`rlora export --format peft --task T`")
        else:
            msg = f"no {PEFT_CONFIG} in the folder: export with `rlora export --format peft`"
        found.add(ENGINES, "reject", PEFT_CONFIG, msg)
        return None
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        found.add(ENGINES, "reject", PEFT_CONFIG, f"invalid JSON at line {err.lineno}: re-export the adapter")
        return None


def _has_required_fields(cfg: dict, found: _Findings) -> bool:
    missing_v = [f for f in VLLM_REQUIRED_FIELDS if f not in cfg]
    if missing_v:
        found.add(["vllm"], "reject", ", ".join(missing_v), "missing required configuration fields")
    missing_s = [f for f in SGLANG_REQUIRED_FIELDS if f not in cfg]
    if missing_s:
        found.add(["sglang"], "reject", ", ".join(missing_s), "missing (SGLang reads them unconditionally)")
    if "peft_type" in cfg and str(cfg["peft_type"]).lower() != "lora":
        found.add(["sglang"], "reject", "peft_type", f"is {cfg['peft_type']!r}; SGLang loads only LORA adapters")
    return not (missing_v or missing_s)


def _rank_fits(r, max_lora_rank: Optional[int], sglang_max_lora_rank: Optional[int], found: _Findings) -> bool:
    """False when ``r`` is no positive integer (nothing further can be checked)."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        found.add(ENGINES, "reject", "r", f"must be a positive integer, got {r!r}")
        return False
    vmax = max_lora_rank if max_lora_rank is not None else VLLM_MAX_LORA_RANKS[-1]
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        found.add(["vllm"], "reject", "--max-lora-rank", f"{max_lora_rank} is not one of {list(VLLM_MAX_LORA_RANKS)}")
    elif r > vmax:
        found.add(["vllm"], "reject", "r", f"rank {r} is greater than max_lora_rank {vmax}"
                  + ("" if max_lora_rank is not None else " (the largest vLLM accepts)"))
    if sglang_max_lora_rank is not None and r > sglang_max_lora_rank:
        found.add(["sglang"], "reject", "r", f"rank {r} is greater than --max-lora-rank {sglang_max_lora_rank}")
    return True


def _check_features(folder: Path, cfg: dict, found: _Findings) -> None:
    """Adapter features an engine rejects (bias, DoRA, modules_to_save, ...) or computes differently (rsLoRA)."""
    if cfg.get("bias", "none") != "none":
        found.add(["vllm"], "reject", "bias", f"is {cfg['bias']!r}: adapter bias is not supported")
        found.add(["sglang"], "differs", "bias", f"is {cfg['bias']!r}: SGLang loads no adapter bias")
    if cfg.get("lora_bias"):
        found.add(["vllm"], "reject", "lora_bias", "vLLM does not support LoRA bias")
        found.add(["sglang"], "differs", "lora_bias", "SGLang loads no LoRA bias")
    mts = [m for m in (cfg.get("modules_to_save") or []) if m not in ("classifier", "score")]
    if mts:
        found.add(["vllm"], "reject", "modules_to_save", f"{mts}: vLLM only supports modules_to_save being None")
        found.add(["sglang"], "differs", "modules_to_save", f"{mts}: SGLang loads only LoRA factors")
    if cfg.get("use_dora"):
        found.add(ENGINES, "reject", "use_dora", "DoRA adapters are not supported")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INIT_OK:
        found.add(["vllm"], "reject", "init_lora_weights", f"{init!r} changes the base weights when PEFT loads it")
    for f in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if cfg.get(f):
            found.add(["vllm"], "reject", f, "vLLM does not support it")
    if cfg.get("use_rslora"):
        found.add(["sglang"], "differs", "use_rslora", "SGLang scales by lora_alpha / r and ignores use_rslora: "
                  "write the scale into lora_alpha")
    for f in ("rank_pattern", "alpha_pattern"):
        if cfg.get(f):
            found.add(["sglang"], "differs", f, "SGLang uses one r and lora_alpha for every module")
    if (folder / "added_tokens.json").is_file():
        found.add(["sglang"], "reject", "added_tokens.json", "adapters that add tokens are not supported")


def _check_target_modules(tm, supported: Optional[tuple], arch: Optional[str], found: _Findings) -> None:
    if isinstance(tm, str):
        if tm not in ("all", "all-linear"):
            found.add(["sglang"], "reject", "target_modules",
                      f"{tm!r}: SGLang needs a list of module names or 'all-linear'")
    elif supported is not None:
        bad = sorted(set(tm) - set(supported))
        if bad:
            found.add(["sglang"], "reject", "target_modules", f"{bad} are not LoRA layers of "
                      f"{arch} (supported: {list(supported)})")


def _lora_modules(folder: Path, found: _Findings) -> dict[str, dict[str, tuple[int, ...]]]:
    """module -> {"A": shape, "B": shape} of the adapter's tensors (misnamed tensors are findings)."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in tensor_shapes(folder).items():
        m = TENSOR_KEY.match(key)
        if m is None:
            found.add(["vllm"], "reject", "tensor " + key, "is not named base_model.model.<module>.lora_A/B.weight")
            found.add(["sglang"], "differs", "tensor " + key, "is not a LoRA factor and is not loaded")
            continue
        modules.setdefault(m["module"], {})[m["which"]] = shape
    return modules


def _check_module_tensors(modules: dict, r: int, tm, supported: Optional[tuple], arch: Optional[str],
                          found: _Findings) -> None:
    for module, ab in sorted(modules.items()):
        suffix = module.rsplit(".", 1)[-1]
        if supported is not None and suffix not in supported:
            found.add(ENGINES, "reject", "tensor " + module, f"{suffix} is not a LoRA layer of {arch} "
                      f"(supported: {list(supported)})")
        if set(ab) != {"A", "B"}:
            found.add(ENGINES, "reject", "tensor " + module, f"has lora_{'A' if 'A' in ab else 'B'} without its pair")
            continue
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            found.add(ENGINES, "reject", "tensor " + module, f"lora_A {list(a)} / lora_B {list(b)} do not have "
                      f"rank r={r} (lora_A [r, d_in], lora_B [d_out, r])")
        if isinstance(tm, list) and suffix not in tm:
            found.add(["sglang"], "reject", "tensor " + module, f"{suffix} is not in target_modules {tm}")


def _check_stacking(modules: dict, found: _Findings) -> None:
    """SGLang stacks q/k/v from q_proj and gate/up from gate_proj: a partner missing drops or breaks the others."""
    layers: dict[str, set[str]] = {}
    for module in modules:
        parent, _, suffix = module.rpartition(".")
        layers.setdefault(parent, set()).add(suffix)
    for parent, names in sorted(layers.items()):
        if "q_proj" in names and "v_proj" not in names:
            found.add(["sglang"], "reject", f"{parent}.q_proj", "without v_proj: SGLang stacks q/k/v from q_proj "
                      "and needs v_proj (KeyError)")
        elif names & {"k_proj", "v_proj"} and "q_proj" not in names:
            found.add(["sglang"], "differs", f"{parent}.{'/'.join(sorted(names & {'k_proj', 'v_proj'}))}",
                      "without q_proj: SGLang stacks q/k/v from q_proj and skips these weights")
        if "up_proj" in names and "gate_proj" not in names:
            found.add(["sglang"], "differs", f"{parent}.up_proj", "without gate_proj: SGLang stacks gate/up from "
                      "gate_proj and skips it")


def check_merged_dir(folder: Path) -> list[Finding]:
    """A merged export is served as a plain base model: a ``config.json`` with a supported architecture,
    safetensors weights without LoRA tensors and without a quantization config."""
    folder = Path(folder)
    out: list[Finding] = []
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return [Finding(e, "reject", "config.json", "missing: not a Hugging Face model folder") for e in ENGINES]
    cfg = json.loads(cfg_path.read_text())
    arch = _architecture(cfg)
    if arch not in SUPPORTED_MODULES:
        out += [Finding(e, "reject", "architectures", f"{arch!r} is not one this check knows") for e in ENGINES]
    if cfg.get("quantization_config"):
        out += [Finding(e, "reject", "quantization_config", "a merged model must be plain floats") for e in ENGINES]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        out += [Finding(e, "reject", "model.safetensors", "missing") for e in ENGINES]
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            lora = [k for k in st.keys() if "lora_" in k]
        if lora:
            out += [Finding(e, "reject", f.name, f"holds LoRA tensors ({lora[0]}, ...)") for e in ENGINES]
    return out


def served_ranks(rank: int) -> dict[str, int]:
    """``--max-lora-rank`` for vLLM (the smallest allowed value that holds ``rank``) and SGLang (``rank``)."""
    return {"vllm": smallest_vllm_rank(rank) or rank, "sglang": rank}


def serving_commands(base: str, adapters: dict[str, str], rank: int) -> dict[str, str]:
    """``vllm serve`` and ``python -m sglang.launch_server`` lines that serve ``base`` with every adapter in
    ``adapters`` (``name -> folder``) at once: vLLM needs ``--max-loras >= N`` (it defaults to 1) and
    ``--max-lora-rank`` from its allowed set; SGLang counts the base-only requests in ``--max-loras-per-batch``."""
    n = len(adapters)
    ranks = served_ranks(rank)
    q = shlex.quote
    vllm = (f"vllm serve {q(base)} --enable-lora --max-lora-rank {ranks['vllm']} --max-loras {n} --lora-modules "
            + " ".join(f"{q(name)}={q(str(path))}" for name, path in adapters.items()))
    sgl = (f"python -m sglang.launch_server --model-path {q(base)} --enable-lora --max-lora-rank {ranks['sglang']} "
           f"--max-loras-per-batch {n + 1} --lora-paths "
           + " ".join(f"{q(name)}={q(str(path))}" for name, path in adapters.items()))
    return {"vllm": vllm, "sglang": sgl}
