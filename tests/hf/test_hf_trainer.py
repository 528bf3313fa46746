"""Hugging Face Trainer with its defaults (remove_unused_columns=True) trains an AdapterModel on a dataset with
a `task_ids` column: one SGD step equals the step computed by hand with those per-row ids, with and without
TrainingArguments(gradient_checkpointing=True)."""
import pytest
import torch

import rlora
from hf_helpers import METHODS, TASKS, adapter_model, perturbed
from helpers import tiny_llama

pytestmark = pytest.mark.slow  # Trainer / SFTTrainer start-up: a few seconds per test
LR = 0.5
ROW_TASKS = [2, 0, 1, 1]


def _dataset(tokens):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist(),
                              "labels": tokens.tolist(), "task_ids": ROW_TASKS})


def _collator():
    """The padding collator of examples/hf_trainer.py: the task_ids column must survive it."""
    from transformers import DataCollatorForSeq2Seq

    from rlora.models import load_tokenizer

    return DataCollatorForSeq2Seq(load_tokenizer("smollm2-135m"), padding=True, label_pad_token_id=-100)


def _trainer(model, tokens, out, **args):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=4, optim="sgd",
                              learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
                              use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                              dataloader_num_workers=0, **args)
    return Trainer(model=model, args=targs, train_dataset=_dataset(tokens), data_collator=_collator())


@pytest.mark.parametrize("method,checkpointing", [(m, True) for m in METHODS] + [("mtl", False)])
def test_trainer_step_uses_the_task_ids_column(method, checkpointing, tokens, tmp_path):
    expected_model = adapter_model(method).train()
    expected_model(tokens, labels=tokens, task_ids=torch.tensor(ROW_TASKS)).loss.backward()
    expected = {n: (p - LR * p.grad).detach() for n, p in expected_model.named_parameters() if p.requires_grad}

    model = adapter_model(method)
    trainer = _trainer(model, tokens, tmp_path, gradient_checkpointing=checkpointing)
    trainer.train()
    assert model.is_activation_checkpointing == checkpointing
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    worst = max((got[n] - e).abs().max().item() for n, e in expected.items())
    assert worst <= 1e-6, worst


def test_bare_injected_model_under_trainer_names_the_fix(tokens, tmp_path):
    """The column is dropped when the model's forward does not name it: the error says what to change."""
    model = perturbed(rlora.inject(tiny_llama(), rlora.AdapterConfig(method="mtl", tasks=TASKS)))
    with pytest.raises(rlora.AdapterError, match=r"Trainer.*get_adapter_model"):
        _trainer(model, tokens, tmp_path).train()


@pytest.mark.parametrize("task", [0, 2])
def test_trl_sft_trainer_routes_the_task_ids_column(task, tokens, tmp_path):
    """TRL's SFTTrainer (its fused LM head calls the backbone directly) with `remove_unused_columns=False`, a batch
    of one task and gradient checkpointing: one SGD step moves that task's MTL-LoRA terms and no other task's."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlora.models import load_tokenizer

    model = adapter_model("mtl")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "task_" in n}
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, optim="sgd",
                    learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True,
                    save_strategy="no", logging_strategy="no", disable_tqdm=True, gradient_checkpointing=True,
                    remove_unused_columns=False)
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist(),
                              "labels": tokens.tolist(), "task_ids": [task] * 4})
    SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=load_tokenizer("smollm2-135m"),
               data_collator=_collator()).train()
    moved = {t for n, p in model.named_parameters() if n in before
             for t in range(len(TASKS)) if not torch.equal(p[t], before[n][t])}
    assert moved == {task}
