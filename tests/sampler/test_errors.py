"""Every bad input gives a one-line error naming the problem and the fix."""
from __future__ import annotations

import re

import numpy as np
import pytest
from pydantic import ValidationError

from rlora.config import ConfigError, SamplerConfig, validate_config
from rlora.sampler import DynamicBalancer, SamplerError, TaskSampler, compute_probabilities, steps_per_epoch

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


def test_argument_errors_name_the_argument():
    _raises(lambda: make("uniform", batch_size=2.5), r"^batch_size must be an integer, got 2.5$")
    _raises(lambda: make("uniform", batch_size=True), r"^batch_size must be an integer, got True$")
    _raises(lambda: make("uniform", world_size=0), r"^world_size must be >= 1, got 0$")
    _raises(lambda: make("uniform", rank=-1), r"^rank must be >= 0, got -1$")
    _raises(lambda: make("uniform", num_epochs="many"), r"^num_epochs must be a number > 0, got 'many'$")
    s = make("uniform")
    _raises(lambda: s.epoch_of(-1), r"^task_id must be >= 0, got -1$")
    _raises(lambda: s.epoch_of(4), r"^task_id 4 is out of range: there are 4 tasks$")
    assert s.epoch_of(3) == 0 and s.epoch_of("code") == 0


def test_steps_per_epoch_batch_and_zero_probability_errors():
    _raises(lambda: steps_per_epoch([1, 2], [0.5, 0.5], 0),
            r"^steps_per_epoch: global_batch_size must be >= 1, got 0$")
    _raises(lambda: steps_per_epoch([1, 2], [0.0, 0.0], 4), r"^steps_per_epoch: every probability is 0$")
    # a batch of 1 is valid; the default stopping strategy is all_exhausted: max(1 / 0.5, 2 / 0.5)
    assert steps_per_epoch([1, 2], [0.5, 0.5], 1) == 4.0


def test_task_weight_errors():
    _raises(lambda: make("uniform", task_weights=[1.0, 2.0]), r"^2 task weights for 4 tasks: give one weight per task$")
    _raises(lambda: make("uniform", task_weights=[1.0, float("inf"), 1.0, 1.0]),
            r"^data.tasks\[nli\].weight must be a finite number >= 0, got inf$")
    _raises(lambda: make("uniform", task_weights=[1.0, -1.0, 1.0, 1.0]),
            r"^data.tasks\[nli\].weight must be a finite number >= 0, got -1.0$")
    _raises(lambda: make("uniform", task_weights=[0.0] * 4),
            r"^every data.tasks\[\].weight is 0: give at least one task a positive weight$")
    _raises(lambda: make("round_robin", task_weights=[2.0, 1.0, 1.0, 1.0]),
            r"^data.tasks\[\].weight does not combine with sampler.strategy=round_robin: remove the weights or use "
            r"proportional, temperature, capped, uniform or dynamic$")
    # a weight of 0 is allowed and drops the task: uniform 1/4 times (0, 1, 1, 2)
    s = make("uniform", task_weights=[0.0, 1.0, 1.0, 2.0])
    assert s.probabilities.tolist() == [0.0, 0.25, 0.25, 0.5]


def test_dynamic_settings_are_checked_by_the_balancer_itself():
    """Configs built without validation (model_construct) still fail with the field named."""
    for kw, pattern in [({"dynamic_tau": 0.0}, r"^sampler.dynamic_tau must be > 0, got 0.0$"),
                        ({"dynamic_floor": 1.5}, r"^sampler.dynamic_floor must be in \[0, 1\], got 1.5$"),
                        ({"dynamic_interval": 0},
                         r"^sampler.dynamic_interval and dynamic_window must be >= 1, got 0 and 10$"),
                        ({"dynamic_window": 0},
                         r"^sampler.dynamic_interval and dynamic_window must be >= 1, got 10 and 0$")]:
        cfg = SamplerConfig.model_construct(strategy="dynamic", **kw)
        _raises(lambda: DynamicBalancer(np.array([1, 3]), cfg), pattern)
    # the ends of [0, 1] are valid floors: f = 1 is uniform, f = 0 the plain prior
    full = DynamicBalancer(np.array([1, 3]), SamplerConfig(strategy="dynamic", dynamic_floor=1.0))
    assert full.probabilities.tolist() == [0.5, 0.5]
    none = DynamicBalancer(np.array([1, 3]), SamplerConfig(strategy="dynamic", dynamic_floor=0.0))
    assert none.probabilities.tolist() == [0.25, 0.75]


def test_bad_update_values_name_the_problem():
    s = make("dynamic", cfg_kw={"dynamic_signal": "loss_ratio+conflict"})
    for step in (True, 2.5):
        _raises(lambda: s.update([1.0] * 4, step=step), rf"^update: step must be a non-negative integer, got {step}$")
    _raises(lambda: s.update(["a", "b", "c", "d"]),
            r"^update: task_losses must be a sequence of floats \(NaN for an absent task\)$")
    _raises(lambda: s.update([1.0] * 4, conflict=[["a"] * 4] * 4),
            r"^update: conflict must be a T x T array of gradient cosines$")


def test_task_list_errors_name_the_entry():
    _raises(lambda: make("uniform", sizes=5, names=None), r"^task_sizes must be a sequence of example counts, got int$")
    _raises(lambda: make("uniform", sizes=[1, 2], names=["a", 5]), r"^task_names\[1\] must be a non-empty string, got 5$")
    _raises(lambda: make("uniform", sizes=[1, 2], names=["a", ""]), r"^task_names\[1\] must be a non-empty string, got ''$")


def test_strategy_settings_checked_without_validation():
    bad_floor = SamplerConfig.model_construct(strategy="dynamic", dynamic_floor=1.5)
    _raises(lambda: compute_probabilities([1, 3], bad_floor), r"^sampler.dynamic_floor must be in \[0, 1\], got 1.5$")
    unknown = SamplerConfig.model_construct(strategy="greedy")
    _raises(lambda: compute_probabilities([1, 3], unknown),
            r"^sampler.strategy 'greedy' is unknown: use proportional, temperature, capped, uniform, round_robin, "
            r"probabilities or dynamic$")
    # the boundary values are valid: a cap of 1 is uniform, a floor of 1 is uniform
    assert compute_probabilities([1, 3], SamplerConfig(strategy="capped", cap=1)).tolist() == [0.5, 0.5]
    assert compute_probabilities([1, 3], SamplerConfig(strategy="dynamic", dynamic_floor=1.0)).tolist() == [0.5, 0.5]


def test_homogeneous_task_of_exactly_one_micro_batch_is_fine():
    s = make("uniform", sizes=[4, 50], names=None, batch_size=4, cfg_kw={"batch_composition": "homogeneous"})
    assert len(s.next_batch()) == 4
