"""fwd+bwd time (with input grad) of one adapted linear 896->4864 over 1024 tokens, as a ratio to the
frozen base linear: PEFT LoRA r=8 and r=24 beside each rlora method at N=3, r=8.

    python benchmarks/layer_overhead.py [--quick] [--json]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, interleaved_median, parser  # noqa: E402

import rlora  # noqa: E402
from rlora.context import task_ids  # noqa: E402
from rlora.layers import LAYERS  # noqa: E402

D_IN, D_OUT, TOKENS, R, N = 896, 4864, 1024, 8, 3


class _Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def peft_layer(base: nn.Linear, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(_Wrap(copy.deepcopy(base)), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                                             lora_dropout=0.05))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return m


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two threads mostly measure noise)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, bias=False).requires_grad_(False)
    x = torch.randn(4, TOKENS // 4, D_IN, requires_grad=True)
    g = torch.randn(4, TOKENS // 4, D_OUT)
    tids = torch.tensor([0, 1, 2, 0])

    layers: dict[str, nn.Module] = {"frozen base": base, "peft lora r=8": peft_layer(base, 8),
                                    "peft lora r=24": peft_layer(base, 24)}
    for method, cls in LAYERS.items():
        cfg = rlora.AdapterConfig(method=method, r=R, num_heads=N, dropout=0.05, tasks=["a", "b", "c"])
        layer = cls(copy.deepcopy(base), cfg, num_tasks=3)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        layers[f"rlora {method} N={N} r={R}" if method != "lora" else f"rlora lora r={R}"] = layer.train()

    def step(m):
        def run():
            with task_ids(tids):
                y = m(x)
            y.backward(g)
            x.grad = None
            for p in m.parameters():
                p.grad = None
        return run

    repeats = 15 if args.quick else 60
    t = interleaved_median({k: step(m) for k, m in layers.items()}, repeats)
    ratios = {k: v / t["frozen base"] for k, v in t.items()}
    print(f"fwd+bwd of one linear {D_IN}->{D_OUT} over {TOKENS} tokens (median of {repeats}, "
          f"torch threads={torch.get_num_threads()})")
    for k, v in t.items():
        print(f"  {k:28s} {v * 1e3:8.2f} ms   {ratios[k]:.3f}x")
    figures = {}
    for k, v in ratios.items():
        if k == "frozen base":
            continue
        key = k.replace("peft lora r=", "peft_lora_r") if k.startswith("peft") else k.split()[1] + "_vs_base"
        figures[key] = figure(v, "<=1.15" if k.startswith("rlora") else "info")
    emit("layer_overhead", figures, args.json)


if __name__ == "__main__":
    main()
