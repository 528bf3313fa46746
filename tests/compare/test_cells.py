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
