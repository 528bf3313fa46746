"""Every bad input gives a one-line error naming the problem and the fix."""
from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from rlora.config import ConfigError, SamplerConfig, validate_config
from rlora.sampler import SamplerError, TaskSampler, compute_probabilities, steps_per_epoch

from .conftest import SIZES, make


def _raises(fn, pattern):
    with pytest.raises(SamplerError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(pattern, msg), msg


def test_task_size_zero_and_negative():
    _raises(lambda: make("uniform", sizes=[5, 0, 3], names=["a", "b", "c"]),
            r"^task 'b' \(id 1\) has 0 examples: drop it from the task list or give it data$")
    _raises(lambda: make("uniform", sizes=[5, -2], names=None), r"^task '1' \(id 1\) has -2 examples")
    _raises(lambda: make("uniform", sizes=[5, 2.5], names=None), r"^task '1' size must be an integer example count")
    _raises(lambda: make("uniform", sizes=[], names=None), r"^task_sizes is empty")


def test_task_names():
    _raises(lambda: make("uniform", sizes=[1, 2], names=["a"]),
            r"^task_names has 1 entries but task_sizes has 2: give one name per task$")
    _raises(lambda: make("uniform", sizes=[1, 2], names=["a", "a"]), r"^task_names has duplicates \['a'\]")


def test_probabilities_errors():
    _raises(lambda: make("probabilities", cfg_kw={"probabilities": {"qa": 0.5, "nli": 0.5, "sum": 0, "code": 0, "x": 1}}),
            r"^sampler.probabilities names unknown task\(s\) \['x'\]: use the task names \['qa', 'nli', 'sum', 'code'\]$")
    _raises(lambda: make("probabilities", cfg_kw={"probabilities": {"qa": 0.5, "nli": 0.5}}),
            r"^sampler.probabilities has no entry for task\(s\) \['sum', 'code'\]: give every task a value")
    _raises(lambda: make("probabilities", cfg_kw={"probabilities": {"qa": -0.1, "nli": 0.5, "sum": 0.3, "code": 0.3}}),
            r"^sampler.probabilities\['qa'\] is negative \(-0.1\): use a value >= 0$")
    _raises(lambda: make("probabilities", cfg_kw={"probabilities": {"qa": float("nan"), "nli": 1, "sum": 0, "code": 0}}),
            r"^sampler.probabilities\['qa'\] is nan: use a finite value >= 0$")
    _raises(lambda: make("probabilities", cfg_kw={"probabilities": {"qa": 0, "nli": 0, "sum": 0, "code": 0}}),
            r"^sampler.probabilities are all 0")
    _raises(lambda: make("probabilities", cfg_kw={"probabilities": None}), r"^sampler.probabilities is not set")


def test_config_level_errors():
    with pytest.raises(ValidationError, match=r"sampler.temperature must be > 0, got 0"):
        SamplerConfig(strategy="temperature", temperature=0)
    for field, value, msg in [("cap", 0, r"sampler.cap must be >= 1, got 0"),
                              ("dynamic_interval", 0, r"sampler.dynamic_interval must be >= 1"),
                              ("dynamic_window", -1, r"sampler.dynamic_window must be >= 1"),
                              ("dynamic_floor", 1.5, r"sampler.dynamic_floor must be in \[0, 1\]"),
                              ("dynamic_conflict_weight", -1, r"sampler.dynamic_conflict_weight must be >= 0")]:
        with pytest.raises(ValidationError, match=msg):
            SamplerConfig(**{field: value})
    with pytest.raises(ConfigError, match=r"^config: sampler.cap: sampler.cap must be >= 1, got 0$"):
        validate_config({"sampler": {"cap": 0}})


def test_unvalidated_config_values_are_still_caught():
    bad_t = SamplerConfig.model_construct(strategy="temperature", temperature=0.0)
    _raises(lambda: compute_probabilities([1, 2], bad_t), r"^sampler.temperature must be > 0, got 0.0$")
    bad_cap = SamplerConfig.model_construct(strategy="capped", cap=0)
    _raises(lambda: compute_probabilities([1, 2], bad_cap), r"^sampler.cap must be >= 1, got 0$")
    bad_tau = SamplerConfig.model_construct(strategy="dynamic", dynamic_tau=-1.0)
    _raises(lambda: TaskSampler([1, 2], bad_tau, batch_size=1), r"^sampler.dynamic_tau must be > 0")


def test_homogeneous_task_smaller_than_a_micro_batch():
    _raises(lambda: make("uniform", sizes=[50, 3, 60], names=["a", "tiny", "c"], batch_size=4,
                         cfg_kw={"batch_composition": "homogeneous"}),
            r"^task 'tiny' has 3 examples, fewer than one micro-batch \(batch_size=4\) in homogeneous mode: "
            r"use sampler.batch_composition=mixed or a smaller batch size$")
    make("uniform", sizes=[50, 3, 60], names=None, batch_size=4)  # mixed is fine


def test_sampler_arguments():
    _raises(lambda: make("uniform", batch_size=0), r"^batch_size must be >= 1, got 0$")
    _raises(lambda: make("uniform", world_size=2, rank=2), r"^rank 2 is out of range for world_size=2: use 0..1$")
    _raises(lambda: make("uniform", seed=-1), r"^seed must be >= 0, got -1$")
    _raises(lambda: make("uniform", max_steps=5, num_epochs=1),
            r"^max_steps and num_epochs are both set: give the sampler one budget$")
    _raises(lambda: make("uniform", max_steps=0), r"^max_steps must be >= 1, got 0$")
    _raises(lambda: make("uniform", num_epochs=0), r"^num_epochs must be a finite number > 0, got 0$")
    _raises(lambda: TaskSampler(SIZES, {"strategy": "uniform"}, batch_size=2),
            r"^cfg must be a rlora.config.SamplerConfig, got dict$")
    s = make("uniform")
    _raises(lambda: s.epoch_of("nope"), r"^unknown task 'nope': use one of \['qa', 'nli', 'sum', 'code'\]$")
    _raises(lambda: s.epoch_of(9), r"^task_id 9 is out of range: there are 4 tasks$")


def test_steps_per_epoch_errors():
    _raises(lambda: steps_per_epoch([1, 2], [1.0], 4), r"^steps_per_epoch: 2 task sizes but 1 probabilities$")
    _raises(lambda: steps_per_epoch([1, 2], [0.5, 0.5], 4, "sometimes"),
            r"^stopping_strategy 'sometimes' is unknown: use first_exhausted or all_exhausted$")
