"""Task-balancing sampler: which task and example fills each micro-batch slot of each rank.

Pure numpy; reproducible from ``(seed, step)``; exact resume through ``state_dict``.
"""
from .dynamic import DynamicBalancer
from .errors import SamplerError, SamplerWarning
from .sampler import TaskSampler
from .strategies import compute_probabilities, steps_per_epoch

__all__ = [
    "DynamicBalancer",
    "SamplerError",
    "SamplerWarning",
    "TaskSampler",
    "compute_probabilities",
    "steps_per_epoch",
]
