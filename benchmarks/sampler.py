"""Task-sampler throughput and its share of a training step.

What is measured (8 tasks, world_size=2, per-rank micro-batch 8, rank 0's sampler; every rank does
the same work):

* ``indices_per_s``: (task, example) pairs returned per second by ``next_batch()``, for every
  strategy x batch composition; ``dynamic`` also gets one ``update()`` per step (a synthetic loss
  feed), as in training. The headline figure is the **slowest** configuration.
* ``step_share``: sampler time per step (slowest configuration) / the wall time of one
  training step of a tiny causal transformer on CPU (2 encoder layers with a causal mask,
  d_model 128, 4 heads, FFN 256, vocab 1000, sequence 64, batch 8: forward, cross-entropy,
  backward and AdamW step; ``torch.set_num_threads(1)``), in percent.

Both are measured in ``R`` rounds (every configuration and the training step once per round, in turn);
a figure is the median over the rounds ± half their range.

Usage: ``python benchmarks/sampler.py [--quick] [--json] [--rounds R]``; with ``--json`` the last stdout
line is one JSON object ``{"benchmark": "sampler", "figures": {...}}``.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, figure, parser, positive_int, show  # noqa: E402
from rlora.config import SamplerConfig  # noqa: E402
from rlora.sampler import TaskSampler  # noqa: E402

TASK_SIZES = [12000, 3000, 45000, 800, 20000, 7000, 60000, 1500]
WORLD, BATCH = 2, 8
STRATEGIES = ["proportional", "temperature", "capped", "uniform", "round_robin", "probabilities", "dynamic"]


def _cfg(strategy: str, composition: str) -> SamplerConfig:
    kw = {}
    if strategy == "probabilities":
        kw["probabilities"] = {str(i): 1.0 / len(TASK_SIZES) for i in range(len(TASK_SIZES))}
    return SamplerConfig(strategy=strategy, batch_composition=composition, **kw)


def sampler_throughput(strategy: str, composition: str, steps: int) -> float:
    """Seconds per step (next_batch, plus update for dynamic) of a fresh sampler over ``steps`` steps."""
    feed_rng = np.random.default_rng(0)
    feed = [(2.0 * np.exp(-0.01 * i) + 0.1 * feed_rng.random(len(TASK_SIZES))).tolist() for i in range(997)]
    s = TaskSampler(TASK_SIZES, _cfg(strategy, composition), batch_size=BATCH, rank=0, world_size=WORLD, seed=0)
    dynamic = strategy == "dynamic"
    t0 = time.perf_counter()
    for i in range(steps):
        s.next_batch()
        if dynamic:
            s.update(feed[i % 997])
    return (time.perf_counter() - t0) / steps


def train_step_timer():
    """A function of ``steps`` giving the median seconds of one forward+backward+AdamW step of a tiny
    causal transformer (built once)."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, d, seq = 1000, 128, 64
    layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.0, batch_first=True)
    model = nn.ModuleDict({"emb": nn.Embedding(vocab, d), "enc": nn.TransformerEncoder(layer, 2),
                           "head": nn.Linear(d, vocab)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mask = nn.Transformer.generate_square_subsequent_mask(seq)
    x = torch.randint(0, vocab, (BATCH, seq + 1))

    def step() -> None:
        h = model["enc"](model["emb"](x[:, :-1]), mask=mask, is_causal=True)
        loss = nn.functional.cross_entropy(model["head"](h).reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()

    def timer(steps: int) -> float:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return timer


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=positive_int, help="rounds (default 3 with --quick, else 5)")
    args = p.parse_args(argv)
    steps = 20_000 if args.quick else 200_000
    rounds = args.rounds or (3 if args.quick else 5)
    print(f"sampler: {len(TASK_SIZES)} tasks, world_size={WORLD}, batch_size={BATCH} per rank, {steps} steps, "
          f"{rounds} rounds")
    timer = train_step_timer()
    keys = [(s, c) for s in STRATEGIES for c in ("mixed", "homogeneous")]
    per_step: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    rates, shares, step_ms = [], [], []
    for _ in range(rounds):
        for k in keys:
            per_step[k].append(sampler_throughput(*k, steps))
        worst = max(per_step[k][-1] for k in keys)
        step_s = timer(10 if args.quick else 40)
        rates.append(BATCH / worst)
        shares.append(100.0 * worst / step_s)
        step_ms.append(step_s * 1e3)
    print(f"{'strategy':<14} {'composition':<12} {'us/step (median of rounds)':>28}")
    for k in keys:
        print(f"{k[0]:<14} {k[1]:<12} {show([v * 1e6 for v in per_step[k]], '8.2f', '')}")
    slowest = max(keys, key=lambda k: statistics.median(per_step[k]))
    print(f"slowest configuration (median): {slowest[0]}/{slowest[1]}; per round the slowest gives "
          f"{show(rates, '.3g', ' indices/s')}")
    print(f"tiny transformer train step (batch {BATCH}, seq 64, CPU, 1 thread): {show(step_ms, '.1f', ' ms')}; "
          f"sampler share {show(shares, '.4f', ' %')}")
    figures = {
        "indices_per_s": figure(rates, ">=1e6", "1/s"),
        "step_share": figure(shares, "<1", "%"),
    }
    emit("sampler", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
