"""Inference cost of an exported merged model and of unmerged adapters, as ratios to the base model:
SmolLM2-135M, one forward pass over a batch of 4 x 128 tokens (no KV cache, no grad).

* merged / base: a LoRA adapter exported with ``rlora export --format merged`` and reloaded with
  ``AutoModelForCausalLM.from_pretrained`` is the base architecture with other weights, so its time
  should equal the base model's (target 1.00 +- 0.05); its logits equal the adapter model's up to
  float32 rounding (the relative logit error is reported);
* adapter / base for each method (lora, hydra, rlora, mtl; r=8, N=3, all default target modules):
  the overhead of serving the unmerged adapter (info).

    python benchmarks/merged_inference.py [--quick] [--json]
"""
from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, interleaved_median, parser  # noqa: E402

import rlora  # noqa: E402
from rlora.context import task_ids  # noqa: E402

BATCH, SEQ, R, N = 4, 128, 8, 3
TASKS = ["a", "b", "c"]


def adapted(method: str, seed: int = 0):
    model = rlora.load_base_model()
    rlora.inject(model, rlora.AdapterConfig(method=method, r=R, num_heads=N, tasks=TASKS, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rlora.adapter_layers(model):
            layer.lora_B.normal_(0.0, 0.02, generator=g)
    return model.eval()


def forward(model, ids, tids=None):
    def run():
        with torch.no_grad(), task_ids(tids):
            model(input_ids=ids, use_cache=False)
    return run


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    from transformers import AutoModelForCausalLM

    from rlora.export import export

    torch.manual_seed(0)
    base = rlora.load_base_model()
    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ))
    tids = torch.tensor([0, 1, 2, 0])
    repeats = 5 if args.quick else 15
    print(f"SmolLM2-135M forward over {BATCH}x{SEQ} tokens (median of {repeats}, torch threads="
          f"{torch.get_num_threads()})")

    with tempfile.TemporaryDirectory() as tmp:
        lora = adapted("lora")
        with torch.no_grad():
            want = lora(input_ids=ids, use_cache=False).logits
        rlora.save_adapter(lora, Path(tmp) / "adapter")
        del lora
        out = export(Path(tmp) / "adapter", format="merged", out=Path(tmp) / "merged")
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        with torch.no_grad():
            diff = merged(input_ids=ids, use_cache=False).logits - want
        max_diff, rel_err = diff.abs().max().item(), (diff.norm() / want.norm()).item()
    del want, diff
    t = interleaved_median({"base": forward(base, ids), "merged": forward(merged, ids)}, repeats, warmup=1)
    merged_ratio = t["merged"] / t["base"]
    print(f"  base           {t['base'] * 1e3:8.1f} ms")
    print(f"  merged (lora)  {t['merged'] * 1e3:8.1f} ms   {merged_ratio:.3f}x   logits vs adapter: relative error "
          f"{rel_err:.2e}, max |diff| {max_diff:.2e}")
    figures = {"merged_over_base": figure(merged_ratio, "1.00±0.05"),
               "merged_relative_logit_error": figure(rel_err, "<=1e-5", unit="rel"),
               "merged_max_abs_logit_diff": figure(max_diff, "info", unit="abs")}
    del merged
    gc.collect()

    for method in ("lora", "hydra", "rlora", "mtl"):
        model = adapted(method)
        tm = interleaved_median({"base": forward(base, ids), method: forward(model, ids, tids)}, repeats, warmup=1)
        ratio = tm[method] / tm["base"]
        print(f"  adapter {method:6s} {tm[method] * 1e3:8.1f} ms   {ratio:.3f}x  (base {tm['base'] * 1e3:.1f} ms)")
        figures[f"adapter_{method}_over_base"] = figure(ratio, "info")
        del model
        gc.collect()
    emit("merged_inference", figures, args.json)


if __name__ == "__main__":
    main()
