"""Fixtures for the trainer tests: a tiny random Llama with the real SmolLM2 tokenizer, synthetic
multi-task folders in the interchange format, and one local Ray instance shared by the module."""
from pathlib import Path

import pytest

from helpers import write_tasks


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, logging_level="ERROR")
    yield ray
    ray.shutdown()
