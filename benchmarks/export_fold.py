"""How close an exported task adapter is to the multi-head adapter it came from, in fp32 and as a serving
engine runs it in bf16 (vLLM, SGLang: base weights, LoRA factors and activations in bf16, ``(x Aᵀ)(s·B)ᵀ``).

For each task of a trained adapter (``rlora train`` output) the relative logit error
``‖logits − logits_adapter(fp32)‖_F / ‖logits_adapter(fp32)‖_F`` over the real tokens of the task's dev
rows is measured for:

* ``fp32``: the export's update merged into fp32 weights (the fold itself: exact for lora/mtl, the
  task's average gates for hydra/rlora);
* ``bf16 compact``: the PEFT export as written (R-LoRA: the net update's own factors, rank <= 2r), served
  in bf16;
* ``bf16 block`` (R-LoRA only): the former representation ``B = [Σḡ B, −B̄⁰], A = [A; A⁰]`` served in bf16;
* ``bf16 floor``: the multi-head adapter model itself run in bf16 (what bf16 costs with no fold at all);
* ``dW bf16 compact`` / ``dW bf16 block``: the relative error that rounding the factors to bf16 makes in the
  update ΔW itself (all layers), without activations.

    python benchmarks/export_fold.py --adapter OUT/RUN/adapter --data DATA_DIR [--tasks a,b] [--quick] [--json]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, parser, positive_int  # noqa: E402

from rlora.adapter_io import load_adapter, read_adapter_config  # noqa: E402
from rlora.export.fold import (ROUTED_METHODS, apply_weights, compact_all, fold_adapter, folded_weights,  # noqa: E402
                               load_dev_examples, reference_pass, relative_errors, served_model, task_index,
                               token_batches)
from rlora.models import load_base_model, load_tokenizer  # noqa: E402


def measure(adapter: Path, data: Path, task: str, max_examples: int, base: str) -> dict[str, float]:
    cfg = read_adapter_config(adapter)
    model = load_adapter(load_base_model(base), adapter).eval()
    tid = task_index(cfg, task)
    batches = token_batches(load_tokenizer(base), load_dev_examples(data, task, max_examples), 256, 4)
    ref = reference_pass(model, batches, tid)
    routed = cfg.method in ROUTED_METHODS
    block = fold_adapter(model, tid, ref.gates if routed else None)
    rank = next(iter(block.values())).rank
    small = compact_all(block) if rank > cfg.r else block
    cands = {"fp32": apply_weights(load_base_model(base), folded_weights(model, cfg.method, tid, block)),
             "bf16 compact": served_model(load_base_model(base), small, torch.bfloat16),
             "bf16 floor": copy.deepcopy(model).to(torch.bfloat16)}
    if small is not block:
        cands["bf16 block"] = served_model(load_base_model(base), block, torch.bfloat16)
    out = relative_errors(model, cands, batches, tid, ref)
    out["rank"], out["block rank"] = next(iter(small.values())).rank, rank
    out["dW bf16 compact"] = update_error(small)
    if small is not block:
        out["dW bf16 block"] = update_error(block)
    return out


def update_error(folds) -> float:
    """``‖bf16(s·B) bf16(A) − s·B A‖_F / ‖s·B A‖_F`` over every layer: what rounding the exported factors to
    bf16 does to the update itself (no activations)."""
    num = den = 0.0
    for f in folds.values():
        exact = f.scaling * f.B.double() @ f.A.double()
        got = (f.scaling * f.B).bfloat16().double() @ f.A.bfloat16().double()
        num += float((got - exact).norm() ** 2)
        den += float(exact.norm() ** 2)
    return (num / den) ** 0.5


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, type=Path, help="a trained adapter folder")
    p.add_argument("--data", required=True, type=Path, help="the run's data directory (one folder per task)")
    p.add_argument("--tasks", help="comma-separated tasks (default: the adapter's first two)")
    p.add_argument("--max-examples", type=positive_int, default=16, help="dev rows per task (default 16; --quick 4)")
    p.add_argument("--base-model", help="base model (default: the adapter's)")
    args = p.parse_args()
    cfg = read_adapter_config(args.adapter)
    tasks = args.tasks.split(",") if args.tasks else list(cfg.tasks[:2])
    n = 4 if args.quick else args.max_examples
    base = args.base_model or cfg.base_model or "smollm2-135m"
    figures = {}
    print(f"{cfg.method} adapter r={cfg.r}, {n} dev rows per task; relative logit error vs the fp32 adapter model")
    for task in tasks:
        res = measure(args.adapter, args.data, task, n, base)
        cols = [k for k in ("fp32", "bf16 compact", "bf16 block", "bf16 floor", "dW bf16 compact", "dW bf16 block")
                if k in res]
        print(f"  {task:24s} rank {res['rank']:>3} (block {res['block rank']:>3})  "
              + "  ".join(f"{k} {res[k]:.4f}" for k in cols))
        for k in cols:
            figures[f"{cfg.method}/{task}/{k.replace(' ', '_')}"] = figure(res[k], "info", unit="", spread=None)
    emit("export_fold", figures, args.json)


if __name__ == "__main__":
    main()
