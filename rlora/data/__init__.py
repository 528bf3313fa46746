"""Multi-task data: reading task folders, prompts and tokenisation, batching, per-task loss, evaluation."""
from .collate import collate
from .errors import DataError
from .evaluate import evaluate_multiple_choice, evaluate_tasks, macro_average, merge_metrics, shard
from .example import Example
from .hf_source import read_hf_source
from .jsonl import read_task_dir
from .loading import load_task, load_tasks, prompt_templates, task_names, task_specs
from .loss import per_task_loss
from .prompts import build_prompt
from .tokenization import IGNORE_INDEX, TokenizedTask, encode_example, tokenize_tasks, truncation_counts

__all__ = ["DataError", "Example", "read_task_dir", "read_hf_source", "load_task", "load_tasks", "task_specs",
           "task_names", "prompt_templates", "build_prompt", "encode_example", "TokenizedTask", "tokenize_tasks",
           "truncation_counts", "IGNORE_INDEX", "collate", "per_task_loss", "evaluate_multiple_choice",
           "evaluate_tasks", "merge_metrics", "macro_average", "shard"]
