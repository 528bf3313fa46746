"""rlora/tracking/probe_budget.py: which tasks a diagnostics pass probes, under a time budget, and how far the
subset's conflict estimate is from the exact matrix."""
import itertools
import math

import numpy as np
import pytest

from diag_models import adapter_model, probe_for, randomise
from rlora.config import SamplerConfig
from rlora.sampler.dynamic import DynamicBalancer
from rlora.tracking import diagnostics as D
from rlora.tracking.metric_names import flatten, top_pairs
from rlora.tracking.probe_budget import (MIN_PROBE_TASKS, ProbePlan, row_mean_standard_error,
                                         tasks_within_budget)


def test_rotation_covers_every_task_each_cycle_and_every_pair_over_cycles():
    plan = ProbePlan(23, seed=3)
    subsets = [plan.next_subset(8) for _ in range(100)]
    assert all(len(s) == 8 and s == sorted(set(s)) for s in subsets)
    for c in range(0, 25):  # any 2 ⌈23/8⌉ = 6 consecutive passes cover every task
        assert set().union(*subsets[c:c + 6]) == set(range(23))
    aligned = ProbePlan(24, seed=3)
    cycles = [[aligned.next_subset(8) for _ in range(3)] for _ in range(4)]  # T = 3k: each 3 passes are one cycle
    assert all(sorted(sum(c, [])) == list(range(24)) for c in cycles)
    together = {p for s in subsets for p in itertools.combinations(s, 2)}
    assert len(together) == 23 * 22 // 2
    assert ProbePlan(23, seed=3).next_subset(8) == subsets[0] and ProbePlan(23, seed=4).next_subset(8) != subsets[0]
    assert ProbePlan(5).next_subset(9) == [0, 1, 2, 3, 4]


def test_tasks_within_budget():
    # allowance 0.1 * 100 s - 2 s spent - 1 s fixed = 7 s, 0.5 s a task
    assert tasks_within_budget(200, 0.1, train_s=100, spent_s=2, fixed_s=1, per_task_s=0.5) == 14
    assert tasks_within_budget(200, 0.2, train_s=100, spent_s=2, fixed_s=1, per_task_s=0.5) == 34
    assert tasks_within_budget(200, 0.1, train_s=1, spent_s=2, fixed_s=1, per_task_s=0.5) == MIN_PROBE_TASKS
    assert tasks_within_budget(200, 0.1, train_s=1, spent_s=2, fixed_s=1, per_task_s=0.5, first=False) == 0
    assert tasks_within_budget(6, 0.1, train_s=1, spent_s=2, fixed_s=1, per_task_s=0.5, first=False) == 6
    assert tasks_within_budget(200, 0.1, train_s=1e4, spent_s=0, fixed_s=0, per_task_s=0.5) == 200
    assert tasks_within_budget(200, None, train_s=0, spent_s=9, fixed_s=9, per_task_s=9) == 200
    assert tasks_within_budget(5, 0.1, train_s=0, spent_s=9, fixed_s=9, per_task_s=9) == 5  # below the floor: all
    # allowance 0.1 * 100 - 2 - 1 = 7 s: 7 s a task affords one (no pair: none), 3.5 s two
    assert tasks_within_budget(200, 0.1, train_s=100, spent_s=2, fixed_s=1, per_task_s=7.0, first=False) == 0
    assert tasks_within_budget(200, 0.1, train_s=100, spent_s=2, fixed_s=1, per_task_s=3.5, first=False) == 2
    assert tasks_within_budget(1, 0.1, train_s=0, spent_s=9, fixed_s=9, per_task_s=9, first=False) == 1  # T <= 8: all


def test_a_larger_time_fraction_probes_more_tasks():
    """Fixed timings (100 s of training, 2 s spent, 1 s fixed, 0.5 s a task, not a first pass): k grows with
    diagnostics.max_time_fraction, from no probe up to all tasks; None probes all."""
    ks = [tasks_within_budget(200, f, train_s=100, spent_s=2, fixed_s=1, per_task_s=0.5, first=False)
          for f in (0.01, 0.05, 0.1, 0.5, 1.0)]
    assert ks == [0, 4, 14, 94, 194]
    plan = ProbePlan(200, passes=1, spent_s=2.0, fixed_s=1.0, per_task_s=0.5, figures_s=0.0)
    assert [plan.choose(f, 100.0, 1.0, 2, 4) for f in (0.01, 0.05, 0.1, 0.5, 1.0, None)] == ks + [200]


def test_plan_estimates_a_task_from_the_step_time_then_from_the_last_pass():
    plan = ProbePlan(100)
    # before any pass: a task = a 4-row step (2 s) scaled to 2 probe rows = 1 s; 0.1 * 200 s - 3 s of figures
    assert plan.choose(0.1, train_s=200.0, step_s=2.0, probe_rows=2, step_rows=4) == 17
    plan.record(pass_s=9.0, probe_s=5.0, probed=20, figures_s=3.0)          # 0.25 s a task, 1 s fixed
    assert (plan.per_task_s, plan.fixed_s, plan.figures_s, plan.spent_s) == (0.25, 1.0, 3.0, 9.0)
    assert plan.choose(0.1, train_s=200.0, step_s=2.0, probe_rows=2, step_rows=4) == 28   # (20 - 9 - 1 - 3) / 0.25
    assert plan.choose(0.1, train_s=100.0, step_s=2.0, probe_rows=2, step_rows=4) == 0    # spent: no probe
    assert plan.draw_figures(0.1, train_s=200.0, pass_s=7.0, last=False)             # 20 - 9 - 7 = 4 >= 3
    assert not plan.draw_figures(0.1, train_s=200.0, pass_s=9.0, last=False)         # 2 < 3
    assert not plan.draw_figures(0.1, train_s=200.0, pass_s=9.0, last=True)          # figures drawn before
    assert ProbePlan(100).draw_figures(0.1, train_s=1.0, pass_s=9.0, last=True)      # none yet: the last pass draws
    assert not ProbePlan(100).draw_figures(0.1, train_s=1.0, pass_s=9.0, last=False)
    assert ProbePlan(100).draw_figures(None, train_s=1.0, pass_s=9.0, last=False)


def test_subset_pass_against_the_exact_matrix():
    """T = 10 tasks: a pass over a subset gives exactly the exact matrix's block; the row means the sampler uses
    are unbiased over the subsets and their spread is the docstring's standard error."""
    tasks = [f"t{i}" for i in range(10)]
    model = randomise(adapter_model("rlora", tasks=tasks), std=0.1)
    probe = probe_for(tasks)
    exact = D.task_interference(model, probe, 10)
    plan = ProbePlan(10, seed=0)
    subset = plan.next_subset(5)
    part = D.task_interference(model, {tasks[t]: probe[tasks[t]] for t in subset}, 10)
    block = np.ix_(subset, subset)
    assert np.abs(part[block] - exact[block]).max() < 1e-12
    assert np.isnan(np.delete(part, subset, axis=0)).all()
    merged = plan.merge(part)
    nxt = plan.next_subset(5)
    assert sorted(set(subset) | set(nxt)) == list(range(10))
    merged = plan.merge(D.task_interference(model, {tasks[t]: probe[tasks[t]] for t in nxt}, 10))
    ok = np.isfinite(merged)
    both = len(set(subset) & set(nxt))
    assert np.abs(merged[ok] - exact[ok]).max() < 1e-12 and ok.sum() == 25 + 25 - both ** 2

    # every k-subset that holds task t: the mean of the estimates of c_t is the exact c_t, their spread the SE
    exact_c = D.interference_summary(exact)
    T, k = 10, 5
    for t in (0, 7):
        est = []
        for s in itertools.combinations(range(T), k):
            if t in s:
                m = np.full_like(exact, np.nan)
                m[np.ix_(s, s)] = exact[np.ix_(s, s)]
                est.append(D.interference_summary(m)[t])
        off = np.delete(exact[t], t)
        assert np.mean(est) == pytest.approx(exact_c[t], abs=1e-12)
        assert np.std(est) == pytest.approx(row_mean_standard_error(off.std(), k, T), rel=1e-9)
    assert row_mean_standard_error(0.3, 10, 10) == 0.0

    # the dynamic sampler takes the partial matrix: unprobed pairs are skipped, not read as 0
    balancer = DynamicBalancer(np.full(10, 10), SamplerConfig(strategy="dynamic", dynamic_signal="loss_ratio+conflict"))
    balancer.observe([1.0] * 10, step=1, conflict=part)
    c = balancer.conflict
    assert np.allclose(c[subset], D.interference_summary(part)[subset], atol=1e-12) and np.isfinite(c).all()


def test_many_tasks_log_the_top_pairs_not_every_pair():
    rng = np.random.default_rng(0)
    T = 30
    m = rng.uniform(-1, 1, (T, T))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    names = [f"task{i}" for i in range(T)]
    metrics = flatten(D.Diagnostics(task_names=names, interference=m))
    assert not [k for k in metrics if "__" in k]
    top = top_pairs(m)
    iu = np.triu_indices(T, 1)
    assert [v for _, _, v in top] == sorted(m[iu])[:10]
    assert [metrics[f"diag/interference/top/{i:02d}"] for i in range(1, 11)] == [v for _, _, v in top]
    assert sum(k.startswith("diag/interference_task/") for k in metrics) == T
    few = flatten(D.Diagnostics(task_names=names[:3], interference=m[:3, :3]))
    assert few["diag/interference/task0__task2"] == m[0, 2] and not [k for k in few if "/top/" in k]


def test_budget_line_states_the_probe_and_the_share():
    plan = ProbePlan(200)
    plan.record(pass_s=3.0, probe_s=2.0, probed=12)
    line = plan.budget_line(50, 12, 66, 2.0, 3.0, 0.1, 60.0)
    assert line == ("[rlora] diagnostics step 50: probed 12/200 tasks (66 pairs) in 2.0s, pass 3.0s; diagnostics "
                    "so far 3.0s = 5.0% of 60.0s training (budget 10%)")
    assert plan.budget_line(50, 12, 66, 2.0, 3.0, 0.01, 60.0, figures=False).endswith("(budget 1%, over)")
    assert "without figures" in plan.budget_line(50, 12, 66, 2.0, 3.0, 0.01, 60.0, figures=False)
    assert math.isfinite(plan.spent_s)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5])
def test_max_time_fraction_out_of_range_is_a_one_line_error(bad):
    from rlora.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"diagnostics.max_time_fraction must be in \(0, 1\] or null") as err:
        load_config(None, [f"diagnostics.max_time_fraction={bad}"])
    assert "\n" not in str(err.value)


def _drive(plan, passes, rng):
    """A fixed sequence of passes: choose k, take the subset, merge a partial matrix, record timings."""
    out = []
    for _ in range(passes):
        k = plan.choose(0.1, train_s=15.0 * (plan.passes + 1), step_s=0.5, probe_rows=2, step_rows=4)
        subset = plan.next_subset(k)
        m = np.full((plan.num_tasks, plan.num_tasks), np.nan)
        m[np.ix_(subset, subset)] = rng.uniform(-1, 1, (len(subset), len(subset)))
        merged = plan.merge(m)
        plan.record(pass_s=1.0 + 0.1 * len(subset), probe_s=0.1 * len(subset), probed=len(subset),
                    figures_s=0.5 if plan.passes % 2 else None)
        out.append((k, subset, merged))
    return out


def test_a_plan_split_by_save_and_restore_goes_on_as_one_straight_plan():
    import json

    straight = _drive(ProbePlan(23, seed=5), 12, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    first = ProbePlan(23, seed=5)
    head = _drive(first, 5, rng)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # plain JSON: NaN stored as null
    restored = ProbePlan.from_state(state)
    assert restored.passes == 5 and restored.cycle == first.cycle and restored.position == first.position
    tail = _drive(restored, 7, rng)
    assert [k for k, _, _ in straight] == [k for k, _, _ in head + tail]
    assert [s for _, s, _ in straight] == [s for _, s, _ in head + tail]
    assert all(np.array_equal(a, b, equal_nan=True) for (_, _, a), (_, _, b) in zip(straight, head + tail))
    assert restored.passes == 12 and restored.spent_s == pytest.approx(sum(1.0 + 0.1 * len(s) for _, s, _ in straight))
    fresh = _drive(ProbePlan(23, seed=5), 7, np.random.default_rng(1))  # what a resume without the state did
    assert [s for _, s, _ in fresh] != [s for _, s, _ in tail]
    assert ProbePlan.from_state(ProbePlan(4).state_dict()).latest is None
    with pytest.raises(ValueError, match="probe plan state is malformed"):
        ProbePlan.from_state({"num_tasks": 3})
