"""Checked cells: malformed input is a one-line CompareError naming the field and the fix."""
import numpy as np
import pytest

from rlora.compare import CompareError, check_cells, group_arms, paired_difference, summarize

from .grid import cell


def good(**changes):
    c = cell("lora", "proportional", 0, {"qa": [1, 0, 1], "nli": [0, 1]})
    c.update(changes)
    return c


def test_checked_cells_hold_arrays_and_optional_fields():
    out = check_cells([good(wall_s=3), good(seed=1, params={"r": 8})])
    assert out[0]["correct"]["qa"].dtype == np.float64 and out[0]["correct"]["qa"].tolist() == [1.0, 0.0, 1.0]
    assert out[0]["wall_s"] == 3.0 and out[0]["params"] is None and out[1]["params"] == {"r": 8}
    assert check_cells([good(correct={"qa": [True, 0.5, 0]})])[0]["correct"]["qa"].tolist() == [1.0, 0.5, 0.0]


def test_group_arms_sorts_seeds_and_keeps_first_appearance_order():
    cells = check_cells([good(method="hydra", seed=2), good(seed=1), good(method="hydra", seed=0)])
    arms = group_arms(cells)
    assert list(arms) == [("hydra", "proportional"), ("lora", "proportional")]
    assert [c["seed"] for c in arms["hydra", "proportional"]] == [0, 2]


@pytest.mark.parametrize("cells, match", [
    ([], "non-empty list"),
    ({"method": "lora"}, "non-empty list"),
    (["lora"], r"cells\[0\] is a str"),
    ([{k: v for k, v in good().items() if k != "correct"}], "has no 'correct'"),
    ([good(method="")], "'method' must be a non-empty string"),
    ([good(seed=1.5)], "'seed' must be an integer"),
    ([good(seed=True)], "'seed' must be an integer"),
    ([good(correct={})], "'correct' must be a non-empty dict"),
    ([good(correct={"qa": []})], r"correct\['qa'\] must be a non-empty flat list"),
    ([good(correct={"qa": [[1, 0]]})], r"correct\['qa'\] must be a non-empty flat list"),
    ([good(correct={"qa": ["yes"]})], r"correct\['qa'\] must be a list of numbers"),
    ([good(correct={"qa": [1, 2, 0]})], r"correct\['qa'\]\[1\] = 2.0 is not a score in \[0, 1\]"),
    ([good(correct={"qa": [1, float("nan")]})], r"correct\['qa'\]\[1\] = nan"),
    ([good(wall_s="fast")], "'wall_s' must be a finite number"),
    ([good(params=[1])], "'params' must be a dict"),
    ([good(), good(seed=1, correct={"qa": [1, 0, 1]})], r"scores different tasks \(missing \['nli'\]"),
    ([good(), good(seed=1, correct={"qa": [1, 0], "nli": [0, 1]})], "has 2 rows for task 'qa' but .* has 3"),
    ([good(), good()], "two cells for method 'lora', sampler 'proportional', seed 0"),
])
def test_bad_cells(cells, match):
    with pytest.raises(CompareError, match=match) as err:
        check_cells(cells)
    assert "\n" not in str(err.value)


def test_bad_comparison_arguments():
    a, b = [good()], [good(method="hydra")]
    with pytest.raises(CompareError, match="unknown statistic 'f1'"):
        paired_difference(a, b, "f1")
    with pytest.raises(CompareError, match="holds seed 0 twice"):
        paired_difference([good(), good(method="x")], b)
    with pytest.raises(CompareError, match="has 2 rows for task 'qa'"):
        paired_difference(a, [good(correct={"qa": [1, 0], "nli": [0, 1]})])
    for kwargs, match in [(dict(n_boot=0), "n_boot must be a positive integer"),
                          (dict(seed=-1), "seed must be an integer >= 0"),
                          (dict(level=95), r"level must be a fraction in \(0, 1\)")]:
        with pytest.raises(CompareError, match=match):
            paired_difference(a, b, **kwargs)
        with pytest.raises(CompareError, match=match):
            summarize(a + b, "lora", **kwargs)
    with pytest.raises(CompareError, match=r"baseline_method 'mtl' has no cells \(methods present: \['lora', 'hydra'\]\)"):
        summarize(a + b, "mtl")


def _without(*keys):
    return {k: v for k, v in good().items() if k not in keys}


@pytest.mark.parametrize("cells, message", [
    ("cells", "cells must be a non-empty list of cell dicts"),
    (["lora"], "cells[0] is a str: each cell must be a dict with method, sampler, seed and correct"),
    ([_without("correct")],
     "cells: cell 0 (lora/proportional/0) has no 'correct': every cell needs method, sampler, seed and correct"),
    ([_without("method", "sampler", "seed")],
     "cells: cell 0 has no 'method': every cell needs method, sampler, seed and correct"),
    ([good(sampler=3)], "cells: cell 0 (lora/3/0): 'sampler' must be a non-empty string, got 3"),
    ([good(seed=1.5)], "cells: cell 0 (lora/proportional/1.5): 'seed' must be an integer, got 1.5"),
    ([good(correct=[1])],
     "cells: cell 0 (lora/proportional/0): 'correct' must be a non-empty dict {task: [score per dev row]}"),
    ([good(correct={"": [1]})],
     "cells: cell 0 (lora/proportional/0): task names in 'correct' must be non-empty strings, got ''"),
    ([good(correct={"qa": [[1, 0]]})],
     "cells: cell 0 (lora/proportional/0): correct['qa'] must be a non-empty flat list, got shape (1, 2)"),
    ([good(correct={"qa": ["yes"]})],
     "cells: cell 0 (lora/proportional/0): correct['qa'] must be a list of numbers (0/1 per dev row)"),
    ([good(correct={"qa": [1, -0.5]})],
     "cells: cell 0 (lora/proportional/0): correct['qa'][1] = -0.5 is not a score in [0, 1]: use 1 for a correct row "
     "and 0 otherwise"),
    ([good(wall_s=True)],
     "cells: cell 0 (lora/proportional/0): 'wall_s' must be a finite number of seconds or absent, got True"),
    ([good(wall_s=float("inf"))],
     "cells: cell 0 (lora/proportional/0): 'wall_s' must be a finite number of seconds or absent, got inf"),
    ([good(params=[1])], "cells: cell 0 (lora/proportional/0): 'params' must be a dict or absent, got list"),
    ([good(), good(seed=1, correct={"qa": [1, 0, 1], "nli": [0, 1], "x": [1]})],
     "cells: lora/proportional/seed 1 scores different tasks (missing [], extra ['x']): every cell must score every "
     "task"),
    ([good(), good(seed=1, correct={"qa": [1, 0], "nli": [0, 1]})],
     "cells: lora/proportional/seed 1 has 2 rows for task 'qa' but lora/proportional/seed 0 has 3: every cell must "
     "score the same dev rows"),
    ([good(), good()],
     "cells: two cells for method 'lora', sampler 'proportional', seed 0: keep one cell per (method, sampler, seed)"),
])
def test_error_messages_in_full(cells, message):
    with pytest.raises(CompareError) as err:
        check_cells(cells)
    assert str(err.value) == message


def test_the_caller_names_the_input():
    with pytest.raises(CompareError, match=r"^grid\[1\] is a int: "):
        check_cells([good(), 5], "grid")
    with pytest.raises(CompareError, match=r"^grid: cell 0 \(lora/proportional/0\): 'params' must be a dict"):
        check_cells([good(params=3)], "grid")


def test_valid_edge_values_are_accepted():
    """Scores 0 and 1 exactly, a zero wall time, a numpy integer seed, empty params."""
    out = check_cells([good(correct={"qa": [0, 1.0], "nli": [1]}, wall_s=0, seed=np.int64(4), params={})])
    assert out[0]["seed"] == 4 and type(out[0]["seed"]) is int
    assert out[0]["wall_s"] == 0.0 and out[0]["params"] == {}


def test_a_resumed_cells_record_counts_the_pieces_before_it():
    """``cell_record``'s wall time: this invocation's seconds plus, for a resumed run, the wall seconds its
    checkpoint carried (the loop's ``wall_seconds_before``); a straight run's is its own time."""
    from rlora.compare.grid import Cell
    from rlora.compare.runner import cell_record
    from rlora.config import RunConfig

    c = Cell("lora", "proportional", 7, RunConfig(), "k", {"ab": 1, "total": 1})
    after = {"qa": {"row_correct": [1, 0], "row_ids": ["a", "b"], "accuracy": 0.5}}
    straight = cell_record(c, {"results_after": after, "wall_seconds_before": 0.0}, 30.0, None)
    resumed = cell_record(c, {"results_after": after, "wall_seconds_before": 412.5, "resumed_from_step": 150},
                          30.0, None)
    assert straight["wall_s"] == 30.0 and resumed["wall_s"] == 442.5 and resumed["resumed_from_step"] == 150
    assert cell_record(c, {"results_after": after}, 30.0, None)["wall_s"] == 30.0  # a summary from before the field
