"""End-to-end training throughput, side by side in one run on the same model (SmolLM2-135M), data (the
shipped demo tasks), batch size, steps and trainable-parameter budget:

  (a) rlora in a plain single-process PyTorch loop (rlora.train.local.train_local)
  (b) Hugging Face Trainer + PEFT LoRA (rank chosen for the same A+B budget)
  (c) rlora through Ray Train + DeepSpeed (ZeRO-2) with 1 worker

All three use one CPU thread. Tokens/s counts non-padding tokens after the first step (steady state).
Time to first step is measured inside the worker, from the start of the training function to the
end of step 1 (model load, tokenisation and engine set-up included; Ray's own start-up excluded).

    python benchmarks/train_throughput.py [--quick] [--json]
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, figure, parser  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "bigbench_default"
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def base_cfg(steps: int, out: str, method: str = "rlora"):
    from rlora.config import validate_config

    return validate_config({
        "model": {"name_or_path": "smollm2-135m"},
        "adapter": {"method": method, "r": 8, "num_heads": 3, "dropout": 0.05, "target_modules": TARGETS},
        "data": {"path": str(DATA), "max_length": 128, "max_train_examples_per_task": 200},
        "sampler": {"strategy": "proportional"},
        "trainer": {"max_steps": steps, "per_device_train_batch_size": 4, "learning_rate": 5e-4, "seed": 0,
                    "output_dir": out, "logging_steps": 10 ** 6, "save_steps": 10 ** 6},
        "deepspeed": {"stage": 2},
        "ray": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        "mlflow": {"enabled": False},
        "eval": {"max_examples_per_task": 0, "before_training": False},
    })


def peft_rank_for_budget(model, rlora_ab: int) -> tuple[int, int]:
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)
    r = max(1, round(rlora_ab / per_rank))
    return r, r * per_rank


def run_local(cfg) -> dict:
    from rlora.train.local import train_local

    res = train_local(cfg, progress=False)
    ab = sum(l.lora_A.numel() + l.lora_B.numel() for _, l in __import__("rlora").adapter_layers(res["model"]))
    return {"tokens_per_s": res["train_tokens_per_s"], "first_step_s": res["time_to_first_step_s"],
            "trainable": res["trainable_params"], "ab": ab}


def run_hf_peft(cfg, rank: int) -> dict:
    """HF Trainer + PEFT LoRA on the same tokenised rows (right padding, the Trainer's own loss)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from rlora.data import collate, load_tasks, tokenize_tasks
    from rlora.models import load_base_model, load_tokenizer
    from rlora.sampler import TaskSampler

    tok = load_tokenizer(cfg.model.name_or_path)
    train = load_tasks(cfg.data, "train")
    names = list(train)
    tokd = tokenize_tasks(tok, train, cfg.data.max_length, cfg.data.use_chat_template)
    bs, steps = cfg.trainer.per_device_train_batch_size, cfg.trainer.max_steps
    sampler = TaskSampler([len(tokd[n]) for n in names], cfg.sampler, batch_size=bs, seed=cfg.trainer.seed,
                          task_names=names, max_steps=steps)
    rows = [tokd[names[t]][i] for _ in range(steps) for t, i in sampler.next_batch()]  # same rows as (a)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collator(feats):
        b = collate(feats, pad, [0] * len(feats))
        return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}

    model = load_base_model(cfg.model.name_or_path)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), state.global_step))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=bs, max_steps=steps,
                                 learning_rate=cfg.trainer.learning_rate, logging_steps=10 ** 6, save_strategy="no",
                                 report_to=[], dataloader_num_workers=0, use_cpu=True, seed=cfg.trainer.seed,
                                 disable_tqdm=True, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()])
        trainer.train()
    tokens_after_first = sum(len(r["input_ids"]) for r in rows[bs:bs * steps])
    elapsed = marks[-1][0] - marks[0][0]
    return {"tokens_per_s": tokens_after_first / elapsed, "first_step_s": marks[0][0] - t0, "trainable": trainable}


def run_ray(cfg) -> dict:
    from rlora.train.launcher import run_training

    t0 = time.perf_counter()
    res = run_training(cfg)
    s = res.summary
    return {"tokens_per_s": s["train_tokens_per_s"], "first_step_s": s["time_to_first_step_s"],
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    steps = 8 if args.quick else 40
    with tempfile.TemporaryDirectory() as out:
        cfg = base_cfg(steps, out)
        a = run_local(cfg)
        from rlora.models import load_base_model

        rank, peft_ab = peft_rank_for_budget(load_base_model("smollm2-135m"), a["ab"])
        b = run_hf_peft(base_cfg(steps, out), rank)
        c = run_ray(base_cfg(steps, out))
    print(f"SmolLM2-135M, {steps} steps x batch 4, demo data, 1 thread; rlora method rlora (N=3, r=8), "
          f"A+B {a['ab']:,} vs PEFT LoRA r={rank} {peft_ab:,}")
    print(f"  (a) rlora plain loop        {a['tokens_per_s']:8.1f} tok/s   first step {a['first_step_s']:.1f}s")
    print(f"  (b) HF Trainer + PEFT LoRA  {b['tokens_per_s']:8.1f} tok/s   first step {b['first_step_s']:.1f}s")
    print(f"  (c) rlora Ray + DeepSpeed   {c['tokens_per_s']:8.1f} tok/s   first step {c['first_step_s']:.1f}s "
          f"(in the worker; whole run {c['wall_s']:.0f}s)")
    ab, ca = a["tokens_per_s"] / b["tokens_per_s"], c["tokens_per_s"] / a["tokens_per_s"]
    print(f"  (a)/(b) = {ab:.2f} (target >= 1.0)   (c)/(a) = {ca:.2f} (target >= 0.9)   "
          f"time to first step (c) = {c['first_step_s']:.1f}s (target <= 20)")
    emit("train_throughput", {
        "plain_vs_hf_peft": figure(ab, ">=1.0"),
        "ray_deepspeed_vs_plain": figure(ca, ">=0.9"),
        "time_to_first_step": figure(c["first_step_s"], "<=20", "s"),
    }, args.json)


if __name__ == "__main__":
    main()
