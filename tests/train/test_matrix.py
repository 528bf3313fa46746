"""Feature combinations through the one training loop (in this process, world size 1, tiny model):
method x batch composition, each with gradient checkpointing, ZeRO stage, gradient accumulation and
bf16 autocast, alone and together. Equivalences are checked, not just "it runs":

* gradient checkpointing on/off: the same adapter (fp32, dropout on: the recompute replays the masks);
* ZeRO-2 and ZeRO-3 vs ZeRO-0: the same adapter (ZeRO-3 within 1e-4, see the test);
* 2 micro-batches of 2 rows vs 1 batch of 4 holding the same rows: the same adapter, since the loss is
  the mean over the optimizer step's answer tokens. The two tasks' answers are number words of 1 to 3
  words, so the micro-batches of a step hold different answer-token counts (asserted) and a
  per-micro-batch mean would give another update. Not for ``align``: its alignment term fits each
  micro-batch's tasks (rlora.alignment), so other micro-batches give another term by design;
* bf16 autocast vs fp32: the same losses and nearly the same update (tolerances in the test), with the
  linear layers' activations really in bfloat16;
* all together (bf16, checkpointing, ZeRO-3, 2 micro-batches) vs the fp32 run on the same rows, with the
  bf16 tolerance.

Every reference run is asserted to move every adapter tensor by far more than the tolerances, so an
equality is never the trivial one of two untrained adapters. The data: two tasks (``next``: the
number after ``i`` in words; ``spell``: ``i`` in words), 32 training rows each; with two tasks,
round-robin ``homogeneous`` micro-batches of 2 (task 0, then task 1) hold the same rows as a
round-robin ``mixed`` batch of 4 (slots 0 1 0 1), so accumulation is compared for both compositions.

The multi-process versions (2 Ray workers, ZeRO-0/2/3, resume) are in test_trainer.py and test_faults.py.
"""
import json
import math
import random

import pytest
import torch

from helpers import run_config
from rlora.train.local import train_local

METHODS = ["lora", "hydra", "rlora", "mtl"]
ALIGN = "align"  # Align-LoRA: the feature combinations, not the accumulation equality (see the module docstring)
TASKS = ["next", "spell"]
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "- - twenty thirty forty fifty sixty seventy eighty ninety".split()
# bf16 vs fp32, relative distance of the adapters' updates (see test_feature_matrix)
BF16_UPDATE_TOL = 0.25


def words(i: int) -> str:
    return ONES[i] if i < 20 else TENS[i // 10] + ("" if i % 10 == 0 else " " + ONES[i % 10])


@pytest.fixture(scope="module")
def word_tasks(tmp_path_factory):
    """Two tasks whose answers have 1 to 3 words (different answer-token counts per row)."""
    root = tmp_path_factory.mktemp("word-tasks")
    rng = random.Random(0)
    makers = {"next": lambda i: (f"What number comes after {i}?", [words(i + 1), words((i + 11) % 100)], words(i + 1)),
              "spell": lambda i: (f"Write {i} in words.", [words(i), words((i + 37) % 100)], words(i))}
    for task, make in makers.items():
        (root / task).mkdir()
        nums = rng.sample(range(99), 40)
        for split, part in (("train", nums[:32]), ("dev", nums[32:])):
            rows = [dict(zip(("input", "options", "target"), make(i)), task=task, id=f"{task}-{i}") for i in part]
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(model_dir, data_dir, tmp_path, **kw):
    base = dict(trainer__max_steps=3, trainer__learning_rate=1e-2, trainer__per_device_train_batch_size=4,
                trainer__warmup_ratio=0.0, sampler__strategy="round_robin", adapter__dropout=0.1,
                deepspeed__stage=0, mlflow__enabled=False, eval__max_examples_per_task=1,
                diagnostics__enabled=False)
    base.update(kw)
    return run_config(model_dir, data_dir, tmp_path, **base)


def train(model_dir, data_dir, tmp_path, **kw):
    out = train_local(config(model_dir, data_dir, tmp_path, **kw), progress=False)
    return out["train_loss"], out["adapter_state"]


def initial_adapter(model_dir, data_dir, tmp_path, method):
    """The adapter as the loop initialises it (same seed, same injection), before any step; the buffers
    (R-LoRA's saved offsets) are left out: they are not trained."""
    from rlora.adapter_io import adapter_state_dict
    from rlora.inject import inject
    from rlora.models import load_base_model

    cfg = config(model_dir, data_dir, tmp_path, adapter__method=method, adapter__tasks=TASKS)
    model = load_base_model(str(model_dir))
    torch.manual_seed(cfg.trainer.seed)
    inject(model, cfg.adapter)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items() if k in trainable}


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def flat(state):
    return torch.cat([state[k].float().flatten() for k in sorted(state)])


def update_distance(run, ref, init):
    """||run - ref|| / ||ref - init|| over all adapter tensors: how far ``run``'s update is from ``ref``'s,
    relative to the size of ``ref``'s update."""
    assert run.keys() == ref.keys() and set(init) <= set(ref)
    run, ref = ({k: s[k] for k in init} for s in (run, ref))
    return ((flat(run) - flat(ref)).norm() / (flat(ref) - flat(init)).norm()).item()


def assert_moved(state, init, at_least=2e-4):
    """Every trained adapter tensor moved by more than ``at_least`` somewhere (twice the loosest equality below;
    the least moving tensors, hydra's routers, move by about 6e-4, the others by 2e-3 to 2e-2)."""
    assert set(init) <= set(state) and init
    still = {k: (state[k].float() - init[k].float()).abs().max().item() for k in init}
    assert min(still.values()) > at_least, {k: v for k, v in still.items() if v <= at_least}


_COUNTS: dict = {}


def micro_batch_answer_tokens(cfg, steps):
    """Answer tokens of each micro-batch of the first ``steps`` optimizer steps, from the loop's own data
    path (sampler, tokenisation, left padding); the same for every method, so computed once per sampler
    setting."""
    t = cfg.trainer
    key = (cfg.data.path, cfg.sampler.batch_composition, t.gradient_accumulation_steps, t.per_device_train_batch_size,
           t.seed, steps)
    if key not in _COUNTS:
        _COUNTS[key] = _count_answer_tokens(cfg, steps)
    return _COUNTS[key]


def _count_answer_tokens(cfg, steps):
    from rlora.models import load_tokenizer
    from rlora.train.batches import answer_tokens, left_padded_batch
    from rlora.train.data_setup import load_train_data

    cfg = cfg.model_copy(deep=True)
    d = load_train_data(cfg, load_tokenizer(cfg.model.name_or_path), 0, 1)
    ga = cfg.trainer.gradient_accumulation_steps
    out = []
    for _ in range(steps):
        step = []
        for _ in range(ga):
            slots = d.sampler.next_batch()
            b = left_padded_batch([d.tokenized[d.names[t]][e] for t, e in slots], d.pad_id, [t for t, _ in slots])
            step.append(answer_tokens(b))
        out.append(step)
    return out


class ActivationDtypes:
    """The dtypes of every nn.Linear output while active (a global forward hook)."""

    def __enter__(self):
        self.seen = set()

        def hook(module, args, output):
            if isinstance(module, torch.nn.Linear) and torch.is_tensor(output):
                self.seen.add(output.dtype)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("composition", ["mixed", "homogeneous"])
@pytest.mark.parametrize("method", METHODS + [ALIGN])
def test_feature_matrix(tiny_model_dir, word_tasks, tmp_path, method, composition):
    """Tolerances. Checkpointing and ZeRO-2 change no arithmetic (1e-6, 1e-5). ZeRO-3 sums gradients in
    another order; where a gradient is near 0 (MTL-LoRA's mixing logits w_t while B is still ~0)
    AdamW's g/sqrt(v) turns that rounding into up to ~1e-4 of the weight (seen: 8e-5 for mtl).

    bf16: autocast rounds the inputs of every matmul to 8 significant bits (unit roundoff
    u = 2^-8 = 3.9e-3). (1) Losses: the random-init model's logits are small, so the loss sits near
    ln V and a relative change of u in the logits moves it by far less than u; allowed 1e-3 relative
    (seen: up to 2e-5), and the losses must differ from fp32 somewhere (bf16 really ran). (2) Update:
    AdamW's first steps move each weight by about lr * g / |g|, so a weight whose gradient is within
    the rounding noise of 0 moves the other way; the update's relative distance to fp32's,
    ||bf16 - fp32|| / ||fp32 - init||, was 0.04 to 0.11 over the methods and compositions; allowed
    0.25. Dropping one of a step's two micro-batches under ZeRO-3 gives 0.77 to 0.94 (lora and mtl, both
    compositions), so the all-together check still bites (tests/mutations/apply_table.py)."""
    common = dict(adapter__method=method, sampler__batch_composition=composition)
    init = initial_adapter(tiny_model_dir, word_tasks, tmp_path, method)
    with ActivationDtypes() as fp32_dtypes:
        ref_loss, ref = train(tiny_model_dir, word_tasks, tmp_path, **common)
    assert all(math.isfinite(x) for x in ref_loss) and len(ref_loss) == 3
    assert_moved(ref, init)
    assert fp32_dtypes.seen == {torch.float32}

    # gradient checkpointing: same arithmetic, recomputed (dropout masks replayed, task ids kept)
    loss, st = train(tiny_model_dir, word_tasks, tmp_path, trainer__gradient_checkpointing=True, **common)
    assert max_diff(ref, st) <= 1e-6 and loss == pytest.approx(ref_loss, abs=1e-6)

    # ZeRO stages: partitioning does not change the update
    for stage, tol in ((2, 1e-5), (3, 1e-4)):
        loss, st = train(tiny_model_dir, word_tasks, tmp_path, deepspeed__stage=stage, **common)
        assert max_diff(ref, st) <= tol, stage
        assert loss == pytest.approx(ref_loss, abs=1e-5)

    # bf16 autocast alone vs fp32: activations in bf16, same losses, nearly the same update
    with ActivationDtypes() as bf16_dtypes:
        loss, st = train(tiny_model_dir, word_tasks, tmp_path, trainer__bf16=True, **common)
    assert torch.bfloat16 in bf16_dtypes.seen
    assert loss == pytest.approx(ref_loss, rel=1e-3) and loss != ref_loss
    assert update_distance(st, ref, init) <= BF16_UPDATE_TOL

    # accumulation alone (dropout off: masks are drawn per micro-batch): 2 micro-batches of 2 equal one
    # mixed batch of 4 with the same rows, although the micro-batches' answer-token counts differ
    off = dict(adapter__method=method, adapter__dropout=0.0)
    two = dict(trainer__gradient_accumulation_steps=2, trainer__per_device_train_batch_size=2,
               sampler__batch_composition=composition)
    counts = micro_batch_answer_tokens(config(tiny_model_dir, word_tasks, tmp_path, **off, **two), 3)
    assert any(len(set(step)) > 1 for step in counts), counts
    if method != ALIGN:
        one_loss, one = train(tiny_model_dir, word_tasks, tmp_path, sampler__batch_composition="mixed", **off)
        assert_moved(one, init)
    acc_loss, acc = train(tiny_model_dir, word_tasks, tmp_path, **two, **off)
    assert_moved(acc, init)
    if method != ALIGN:
        assert max_diff(one, acc) <= 1e-5 and acc_loss == pytest.approx(one_loss, abs=1e-5)

    # all together vs the fp32 run on the same rows (the bf16 tolerances)
    loss, st = train(tiny_model_dir, word_tasks, tmp_path, trainer__bf16=True, trainer__gradient_checkpointing=True,
                     deepspeed__stage=3, **two, **off)
    assert len(loss) == 3 and loss == pytest.approx(acc_loss, rel=1e-3)
    assert update_distance(st, acc, init) <= BF16_UPDATE_TOL


@pytest.mark.parametrize("method", METHODS)
def test_accumulation_equals_the_larger_batch(tiny_model_dir, word_tasks, tmp_path, method):
    """2 micro-batches of 2 rows (ZeRO-0 with mixed, ZeRO-2 with homogeneous micro-batches) hold the same
    rows as one mixed batch of 4; with dropout off the update is the same. The answers have 1 to 3
    words, so the two micro-batches of a step hold different answer-token counts (asserted): a
    per-micro-batch mean would weight the tokens differently and give another update."""
    common = dict(adapter__method=method, adapter__dropout=0.0)
    init = initial_adapter(tiny_model_dir, word_tasks, tmp_path, method)
    ref_loss, ref = train(tiny_model_dir, word_tasks, tmp_path, **common)
    assert_moved(ref, init)
    for stage, composition in ((0, "mixed"), (2, "homogeneous")):
        two = dict(trainer__gradient_accumulation_steps=2, trainer__per_device_train_batch_size=2,
                   deepspeed__stage=stage, sampler__batch_composition=composition, **common)
        counts = micro_batch_answer_tokens(config(tiny_model_dir, word_tasks, tmp_path, **two), 3)
        assert any(len(set(step)) > 1 for step in counts), counts
        loss, st = train(tiny_model_dir, word_tasks, tmp_path, **two)
        assert max_diff(ref, st) <= 1e-5, (stage, composition)
        assert loss == pytest.approx(ref_loss, abs=1e-5)


def test_embedded_model_smoke(task_dir, tmp_path):
    """The embedded SmolLM2-135M with MTL-LoRA, gradient checkpointing, 2 micro-batches, bf16 autocast and
    ZeRO-2: two optimizer steps with finite losses that move the adapter."""
    from rlora.config import validate_config

    cfg = validate_config({
        "adapter": {"method": "mtl", "r": 4, "num_heads": 2, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(task_dir), "max_length": 64},
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                    "gradient_checkpointing": True, "bf16": True, "learning_rate": 1e-3, "output_dir": str(tmp_path)},
        "deepspeed": {"stage": 2}, "mlflow": {"enabled": False}, "diagnostics": {"enabled": False},
        "eval": {"max_examples_per_task": 1, "before_training": False}})
    out = train_local(cfg, progress=False)
    assert len(out["train_loss"]) == 2 and all(math.isfinite(x) for x in out["train_loss"])
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in out["adapter_state"].items())
