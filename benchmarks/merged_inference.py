"""Inference cost of an exported merged model and of unmerged adapters, as ratios to the base model:
SmolLM2-135M, one forward pass over a batch of 4 x 128 tokens (no KV cache, no grad).

* merged / base: a LoRA adapter exported with ``rlora export --format merged`` and reloaded with
  ``AutoModelForCausalLM.from_pretrained`` is the base architecture with other weights, so its time
  should equal the base model's (target 1.00 +- 0.05); its logits equal the adapter model's up to
  float32 rounding (the relative logit error is reported);
* adapter / base for each method (lora, hydra, rlora, mtl; r=8, N=3, all default target modules):
  the overhead of serving the unmerged adapter (info).

Times are measured in interleaved rounds (base and the other model call by call in turn; the median of
each round's calls; the ratio within each round); a figure is the median of the rounds ± half their range.

    python benchmarks/merged_inference.py [--quick] [--json] [--rounds R] [--per-round K]
"""
from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, interleaved_rounds, meets, parser, positive_int, ratios, show  # noqa: E402

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


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=positive_int, help="interleaved rounds (default 3 with --quick, else 5)")
    p.add_argument("--per-round", type=positive_int, help="forward calls per model per round (default 2, else 3)")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from rlora.export import export

    torch.manual_seed(0)
    base = rlora.load_base_model()
    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ))
    tids = torch.tensor([0, 1, 2, 0])
    rounds = args.rounds or (3 if args.quick else 5)
    per_round = args.per_round or (2 if args.quick else 3)
    print(f"SmolLM2-135M forward over {BATCH}x{SEQ} tokens ({rounds} rounds x {per_round} interleaved calls, torch "
          f"threads={torch.get_num_threads()})")

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
    t = interleaved_rounds({"base": forward(base, ids), "merged": forward(merged, ids)}, rounds, per_round, warmup=1)
    merged_ratio = ratios(t["merged"], t["base"])
    print(f"  base           {show([v * 1e3 for v in t['base']], '8.1f', ' ms')}")
    print(f"  merged (lora)  {show([v * 1e3 for v in t['merged']], '8.1f', ' ms')}   {show(merged_ratio)}")
    print(f"  merged logits vs adapter logits: relative error {rel_err:.2e}, max |diff| {max_diff:.2e}")
    figures = {"merged_over_base": figure(merged_ratio, "1.00±0.05"),
               "merged_relative_logit_error": figure(rel_err, "<=1e-5", unit="rel", spread=0.0),
               "merged_max_abs_logit_diff": figure(max_diff, "info", unit="abs", spread=0.0)}
    del merged
    gc.collect()

    for method in ("lora", "hydra", "rlora", "mtl"):
        model = adapted(method)
        tm = interleaved_rounds({"base": forward(base, ids), method: forward(model, ids, tids)}, rounds, per_round,
                                warmup=1)
        ratio = ratios(tm[method], tm["base"])
        print(f"  adapter {method:6s} {show([v * 1e3 for v in tm[method]], '8.1f', ' ms')}   {show(ratio)}")
        figures[f"adapter_{method}_over_base"] = figure(ratio, "info")
        del model
        gc.collect()
    lo, hi = figures["merged_over_base"]["value"] - 0.05, figures["merged_over_base"]["value"] + 0.05
    print(f"  target merged_over_base 1.00±0.05: {'holds' if lo <= 1.0 <= hi else 'MISSED'}")
    ok = meets(rel_err, "<=1e-5")
    print(f"  target merged_relative_logit_error <=1e-5: {'holds' if ok else 'MISSED'}")
    emit("merged_inference", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
