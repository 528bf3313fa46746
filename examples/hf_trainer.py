"""Fine-tune a causal LM with MTL-LoRA from a plain Hugging Face Trainer (or TRL SFTTrainer) script.

A PEFT script with one line changed: ``model = rlora.get_adapter_model(model, config)`` instead of
``get_peft_model``. The dataset carries a ``task_ids`` column (each row's task index); Trainer keeps it
because the adapter model's ``forward`` names it. Trains a few steps with gradient checkpointing,
saves the adapter (``trainer.save_model``), reloads it onto a fresh base model and generates one
answer per task, all tasks in one batch.

    python examples/hf_trainer.py                         # Trainer, ../shared/data/mtl_cpu6, smollm2-135m
    python examples/hf_trainer.py --trainer trl           # the same with TRL's SFTTrainer
    python examples/hf_trainer.py --steps 20 --out runs/hf
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import rlora

REPO = Path(__file__).resolve().parents[1]


def read_rows(data: Path, split: str, per_task: int) -> tuple[list[str], list[dict]]:
    """The task names (sorted folder names: their index is the task id) and the first rows of each."""
    tasks = sorted(p.name for p in data.iterdir() if (p / f"{split}.jsonl").is_file())
    if not tasks:
        raise SystemExit(f"--data {data}: no task folder with a {split}.jsonl; point --data at a folder of tasks")
    rows = []
    for task_id, task in enumerate(tasks):
        with open(data / task / f"{split}.jsonl") as f:
            for line, _ in zip(f, range(per_task)):
                rows.append({**json.loads(line), "task_ids": task_id})
    return tasks, rows


def prompt(row: dict) -> str:
    options = row["options"]
    listed = f"\nOptions: {', '.join(options)}" if isinstance(options, list) else ""
    return f"{row['input']}{listed}\nAnswer:"


def tokenize(rows: list[dict], tokenizer, max_length: int):
    """input_ids / attention_mask / labels (prompt tokens masked with -100) / task_ids, one dict per row."""
    out = []
    for row in rows:
        p = tokenizer(prompt(row), add_special_tokens=False)["input_ids"]
        a = tokenizer(" " + row["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + a)[-max_length:]
        labels = ([-100] * len(p) + a)[-max_length:]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "task_ids": row["task_ids"]})
    return out


def train_hf(model, tokenizer, train, args, out: Path):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=args.lr, gradient_checkpointing=True, logging_steps=1,
                              save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(train), data_collator=collator)
    trainer.train()
    return trainer


def train_trl(model, tokenizer, train, args, out: Path):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq
    from trl import SFTConfig, SFTTrainer

    cfg = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                    learning_rate=args.lr, gradient_checkpointing=True, logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True, max_length=args.max_length,
                    remove_unused_columns=False)  # SFTTrainer keeps only its own columns of a tokenized dataset
    # already tokenized rows (labels mask the prompt); the collator pads them and keeps task_ids
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(train), processing_class=tokenizer,
                         data_collator=collator)
    trainer.train()
    return trainer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "mtl_cpu6")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--trainer", choices=["hf", "trl"], default="hf")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rows-per-task", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="rlora-hf-"))

    tasks, rows = read_rows(args.data, "train", args.rows_per_task)
    tokenizer = rlora.load_tokenizer(args.model)
    train = tokenize(rows, tokenizer, args.max_length)

    model = rlora.load_base_model(args.model)
    config = rlora.AdapterConfig(method="mtl", r=8, num_heads=3, alpha=16, tasks=tasks)
    model = rlora.get_adapter_model(model, config)          # was: peft.get_peft_model(model, lora_config)
    model.print_trainable_parameters()

    t0 = time.perf_counter()
    trainer = (train_trl if args.trainer == "trl" else train_hf)(model, tokenizer, train, args, out)
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    print(f"{args.trainer} trainer: {args.steps} steps with gradient checkpointing in "
          f"{time.perf_counter() - t0:.1f} s, loss per step {losses}")

    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    print(f"saved {adapter_dir}: {sorted(p.name for p in adapter_dir.iterdir())}")

    loaded = rlora.AdapterModel.from_pretrained(rlora.load_base_model(args.model), adapter_dir)
    _, dev = read_rows(args.data, "dev", 1)
    tokenizer.padding_side = "left"
    batch = tokenizer([prompt(r) for r in dev], return_tensors="pt", padding=True, add_special_tokens=False)
    task_ids = torch.tensor([r["task_ids"] for r in dev])
    gen = loaded.generate(**batch, task_ids=task_ids, max_new_tokens=8, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for r, text in zip(dev, texts):
        print(f"  {r['task']:<14} target {r['target']!r:<32} generated {text.strip()!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
