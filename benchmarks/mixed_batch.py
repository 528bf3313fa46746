"""One batch that mixes T = 8 tasks: MTL-LoRA in one pass vs PEFT with 8 LoRA adapters, as ratios to
the frozen base on the same tokens.

The model is a stack of 4 residual linear blocks ``x <- x + W_i x`` (W_i: 896 -> 896, no bias, every
W_i adapted), fed 32 sequences x 64 tokens (2048 tokens, 4 sequences per task, tasks shuffled).

* rlora: ``MTLLoRALinear`` (r = 8, n = 3 up-projections, one Λ_t and w_t per task, dropout 0.05) --
  the whole mixed batch in one forward with per-sample task ids.
* PEFT: 8 LoRA adapters (r = 8, alpha = 16, dropout 0.05), one per task. Training: PEFT refuses a
  mixed batch in train mode (``adapter_names=`` raises; the message is printed), so its way is one
  sub-batch per task: ``set_adapter(task)``, forward, backward. Inference: PEFT's mixed-adapter
  batch ``model(x, adapter_names=[...])`` in eval mode under ``no_grad``.

Training is fwd + bwd with the input gradient (as for a layer inside a network) and the adapter
gradients; the frozen base does fwd + bwd for the input gradient only. An extra training row runs
MTL-LoRA with dropout 0 (info): MTL-LoRA drops out the layer input x [tokens, 896] as LoRA does, and
drawing that mask is a visible share of the adapter's cost on CPU (``rlora.layers.dropout`` draws it
about 2x cheaper than ``F.dropout``; PEFT uses ``nn.Dropout``).

Each round runs every contender call by call in turn and takes the median of its calls; ratios are formed
within a round; a figure is the median of the rounds ± half their range.

    python benchmarks/mixed_batch.py [--quick] [--json] [--threads N] [--rounds R] [--per-round K]
                                     [--device cpu|cuda] [--dtype float32|bfloat16] [--seq L]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, interleaved_rounds, meets, parser, positive_int, ratios, show  # noqa: E402
from layer_overhead import DTYPES, check_device, device_args  # noqa: E402

import rlora  # noqa: E402
from rlora.context import task_ids  # noqa: E402
from rlora.layers import MTLLoRALinear  # noqa: E402

D, BLOCKS, TASKS, PER_TASK, SEQ, R, HEADS = 896, 4, 8, 4, 64, 8, 3


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return x + self.proj(x)


class Stack(nn.Module):
    def __init__(self, d: int, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def mtl_stack(base: Stack, dropout: float = 0.05) -> Stack:
    """A copy of ``base`` with every W_i wrapped in MTL-LoRA (r = 8, n = 3, one Λ_t and w_t per task)."""
    cfg = rlora.AdapterConfig(method="mtl", r=R, num_heads=HEADS, alpha=2 * R, dropout=dropout,
                              tasks=[f"t{i}" for i in range(TASKS)])
    m = copy.deepcopy(base)
    for b in m.blocks:
        b.proj = MTLLoRALinear(b.proj, cfg, num_tasks=TASKS)
        with torch.no_grad():
            b.proj.lora_B.normal_(0, 0.01)
    return m


def peft_stack(base: Stack):
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.05, target_modules=["proj"])
    m = get_peft_model(copy.deepcopy(base), lc, adapter_name="t0")
    for i in range(1, TASKS):
        m.add_adapter(f"t{i}", lc)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    w = next(base.parameters())
    return m.to(w.device, w.dtype)


def n_params(m: nn.Module, key: str) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if key in n)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: stable on a shared "
                                                                    "machine)")
    ap.add_argument("--seq", type=positive_int, default=SEQ, help=f"tokens per sequence (default {SEQ})")
    device_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev, dtype = check_device(args.device), DTYPES[args.dtype]
    seq = args.seq
    torch.manual_seed(0)

    base = Stack(D, BLOCKS).to(dev, dtype)
    with torch.no_grad():
        for b in base.blocks:
            b.proj.weight.mul_(0.5)          # keep the residual stream's scale moderate
    base.requires_grad_(False)
    mtl, mtl0, peft = mtl_stack(base), mtl_stack(base, dropout=0.0), peft_stack(base)
    n_seq = TASKS * PER_TASK
    tids = torch.arange(TASKS).repeat_interleave(PER_TASK)[torch.randperm(n_seq)]
    names = [f"t{i}" for i in tids.tolist()]
    x = torch.randn(n_seq, seq, D, device=dev, dtype=dtype)
    g = torch.randn(n_seq, seq, D, device=dev, dtype=dtype)
    groups = [(f"t{t}", (tids == t).nonzero().squeeze(1).to(dev)) for t in range(TASKS)]
    x_sub = {t: x[i].clone().requires_grad_(True) for t, i in groups}
    g_sub = {t: g[i].clone() for t, i in groups}
    x_leaf = x.clone().requires_grad_(True)

    # PEFT and the mixed batch in training mode
    peft.train()
    try:
        peft(x_leaf, adapter_names=names)
        refusal = "accepted (no error)"
    except ValueError as err:
        refusal = f"ValueError: {err}"
    import peft as peft_pkg

    print(f"peft {peft_pkg.__version__}, model(x, adapter_names=...) in train mode: {refusal}")

    # correctness: the mixed batch equals the per-task sub-batches
    mtl.eval()
    with torch.no_grad():
        with task_ids(tids):
            mixed = mtl(x)
        diff = 0.0
        for t, i in groups:
            with task_ids(int(t[1:])):
                diff = max(diff, (mtl(x[i]) - mixed[i]).abs().max().item())
    print(f"MTL-LoRA mixed batch vs per-task sub-batches: max |diff| = {diff:.2e}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def clear(m):
        for p in m.parameters():
            p.grad = None

    def train_base():
        y = base(x_leaf)
        y.backward(g)
        x_leaf.grad = None
        sync()

    def train_mtl():
        with task_ids(tids):
            y = mtl(x_leaf)
        y.backward(g)
        x_leaf.grad = None
        clear(mtl)
        sync()

    def train_mtl0():
        with task_ids(tids):
            y = mtl0(x_leaf)
        y.backward(g)
        x_leaf.grad = None
        clear(mtl0)
        sync()

    def train_peft():
        for t, _ in groups:
            peft.set_adapter(t)
            y = peft(x_sub[t])
            y.backward(g_sub[t])
            x_sub[t].grad = None
        clear(peft)
        sync()

    def infer_base():
        with torch.no_grad():
            base(x)
        sync()

    def infer_mtl():
        with torch.no_grad(), task_ids(tids):
            mtl(x)
        sync()

    def infer_peft():
        with torch.no_grad():
            peft(x, adapter_names=names)
        sync()

    def infer_peft_split():
        with torch.no_grad():
            for t, i in groups:
                peft.set_adapter(t)
                peft(x[i])
        sync()

    rounds = args.rounds or (5 if args.quick else 10)
    per_round = args.per_round or (2 if args.quick else 4)
    mtl.train()
    mtl0.train()
    peft.train()
    tr = interleaved_rounds({"base": train_base, "rlora": train_mtl, "peft": train_peft, "rlora_p0": train_mtl0},
                            rounds, per_round)
    mtl.eval()
    peft.eval()
    inf = interleaved_rounds({"base": infer_base, "rlora": infer_mtl, "peft": infer_peft,
                              "peft_split": infer_peft_split}, rounds, per_round)

    tokens = n_seq * seq
    print(f"{BLOCKS} residual blocks x <- x + W x (W {D}x{D}), {n_seq} sequences x {seq} tokens = {tokens} tokens, "
          f"{TASKS} tasks mixed, {args.dtype} on {dev.type}, torch threads={torch.get_num_threads()}; {rounds} rounds "
          f"x {per_round} interleaved calls")
    print(f"trainable parameters: MTL-LoRA r={R} n={HEADS} {n_params(mtl, 'lora_') + n_params(mtl, 'task_'):,}; "
          f"PEFT {TASKS} x LoRA r={R} {n_params(peft, 'lora_'):,}")
    rows = [
        ("train fwd+bwd", "frozen base", tr["base"], tr["base"]),
        ("train fwd+bwd", "rlora MTL-LoRA, one mixed pass", tr["rlora"], tr["base"]),
        ("train fwd+bwd", "PEFT, 8 sub-batches + set_adapter", tr["peft"], tr["base"]),
        ("train fwd+bwd", "rlora MTL-LoRA, dropout 0 (info)", tr["rlora_p0"], tr["base"]),
        ("inference", "frozen base", inf["base"], inf["base"]),
        ("inference", "rlora MTL-LoRA, one mixed pass", inf["rlora"], inf["base"]),
        ("inference", "PEFT adapter_names= mixed batch", inf["peft"], inf["base"]),
        ("inference", "PEFT, 8 sub-batches + set_adapter", inf["peft_split"], inf["base"]),
    ]
    for mode, name, v, ref in rows:
        print(f"  {mode:14s} {name:36s} {show([s * 1e3 for s in v], '8.3f', ' ms')}   {show(ratios(v, ref))} base")
    f = {
        "train_rlora_vs_base": figure(ratios(tr["rlora"], tr["base"]), "<=1.2"),
        "train_peft_vs_base": figure(ratios(tr["peft"], tr["base"]), "info"),
        "train_rlora_vs_peft": figure(ratios(tr["rlora"], tr["peft"]), "<1"),
        "train_rlora_dropout0_vs_base": figure(ratios(tr["rlora_p0"], tr["base"]), "info"),
        "infer_rlora_vs_base": figure(ratios(inf["rlora"], inf["base"]), "info"),
        "infer_peft_vs_base": figure(ratios(inf["peft"], inf["base"]), "info"),
        "infer_rlora_vs_peft": figure(ratios(inf["rlora"], inf["peft"]), "<1"),
        "mixed_vs_split_max_abs_diff": figure(diff, "info", "abs", spread=0.0),
    }
    for name, fig in f.items():
        ok = meets(fig["value"], fig["target"])
        if ok is not None:
            print(f"  target {name} {fig['target']}: {'holds' if ok else 'MISSED'}")
    emit("mixed_batch", f, args.json)
    return f


if __name__ == "__main__":
    main()
