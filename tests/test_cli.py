"""`rlora evaluate`'s flags, each with its effect (tiny model, in this process): the split and the number of
rows scored, and the scoring options reaching the scorer (equal to calling it directly with them, and
different from the default)."""
import json

import pytest

from helpers import write_tasks
from rlora.cli import main


@pytest.fixture
def data(tmp_path):
    return write_tasks(tmp_path / "data", n_train=6, n_dev=3)


def evaluate(tiny_model_dir, data, tmp_path, *flags) -> dict:
    out = tmp_path / f"m{len(list(tmp_path.glob('m*.json')))}.json"
    assert main(["evaluate", "--data", str(data), "--base-model", str(tiny_model_dir), "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_split_and_max_examples_choose_the_rows(tiny_model_dir, data, tmp_path, capsys):
    assert {t: r["n"] for t, r in evaluate(tiny_model_dir, data, tmp_path).items()} == \
        {"parity": 3, "sign": 3, "size": 3}
    assert {r["n"] for r in evaluate(tiny_model_dir, data, tmp_path, "--split", "train").values()} == {6}
    two = evaluate(tiny_model_dir, data, tmp_path, "--split", "train", "--max-examples", "2")
    first = [json.loads(line)["id"] for line in (data / "parity" / "train.jsonl").read_text().splitlines()[:2]]
    assert {r["n"] for r in two.values()} == {2} and two["parity"]["row_ids"] == first


@pytest.fixture
def long_option_data(tmp_path):
    """The gold option is 12 tokens, the other one: summed log-probs prefer the short one, per-token need not."""
    folder = tmp_path / "lengths" / "pick"
    folder.mkdir(parents=True)
    long = " ".join(["blue"] * 12)
    rows = [{"id": f"dev-{i}", "input": f"Pick number {i}.", "options": ["red", long], "target": long} for i in range(16)]
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.jsonl").write_text(json.dumps({**rows[0], "id": "train-0"}) + "\n")
    return folder.parent


@pytest.mark.parametrize("flags,kwargs", [
    (("--length-normalized",), {"length_normalized": True}),
    (("--max-length", "12"), {"max_length": 12}),
])
def test_scoring_flags_reach_the_scorer(tiny_model_dir, data, long_option_data, tmp_path, capsys, flags, kwargs):
    from rlora.config import DataConfig
    from rlora.data import evaluate_tasks, load_tasks
    from rlora.models import load_base_model, load_tokenizer

    data = long_option_data if "length_normalized" in kwargs else data
    cli = evaluate(tiny_model_dir, data, tmp_path, *flags)
    dev = load_tasks(DataConfig(path=str(data), max_length=kwargs.get("max_length", 256)), "dev")
    model, tok = load_base_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    direct = evaluate_tasks(model, tok, dev, [], **{"max_length": 256, "progress": False, **kwargs})
    default = evaluate_tasks(model, tok, dev, [], max_length=256, progress=False)
    for t in direct:
        assert cli[t]["row_correct"] == direct[t]["row_correct"]
        assert cli[t]["loss"] == pytest.approx(direct[t]["loss"], abs=1e-5)
    if "max_length" in kwargs:  # prompts cut to 12 tokens: the answer is scored on another context
        assert any(abs(cli[t]["loss"] - default[t]["loss"]) > 1e-3 for t in cli)
    else:  # summed log-probs never pick the 12-token gold option; per-token scores pick it at least once
        assert sum(default["pick"]["row_correct"]) == 0 < sum(cli["pick"]["row_correct"])


def test_batch_size_sets_rows_per_forward_and_leaves_results_alone(tiny_model_dir, data, tmp_path, monkeypatch):
    """`--batch-size`: fewer rows per forward means more forwards; the scores stay the same."""
    import torch

    import rlora.models

    forwards: list[int] = []
    real = rlora.models.load_base_model

    def counted(*a, **kw):
        model = real(*a, **kw)
        model.get_decoder().register_forward_pre_hook(lambda m, args: forwards.append(1))  # the scorer runs the decoder
        return model

    monkeypatch.setattr(rlora.models, "load_base_model", counted)
    runs = {}
    for bs in (1, 16):
        forwards.clear()
        runs[bs] = (evaluate(tiny_model_dir, data, tmp_path, "--batch-size", str(bs)), len(forwards))
    (one, n_one), (many, n_many) = runs[1], runs[16]
    assert n_one >= 9 and n_one > n_many >= 3  # 9 rows: >= one forward each at batch 1; 3 tasks
    for t in one:
        assert one[t]["row_correct"] == many[t]["row_correct"]
        assert one[t]["accuracy"] == many[t]["accuracy"]
        assert torch.allclose(torch.tensor(one[t]["loss"]), torch.tensor(many[t]["loss"]), atol=1e-5)
