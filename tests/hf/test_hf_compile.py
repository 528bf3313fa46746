"""`torch.compile` of every method: one graph for the whole forward (fullgraph: a graph break raises) and no
recompile when the batch brings other task-id values."""
import pytest

from hf_helpers import METHODS, adapter_model

pytestmark = pytest.mark.slow  # dynamo traces the whole model: a few seconds per test
BATCHES = [[0, 1, 2, 0], [2, 2, 2, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("method", METHODS)
def test_compile_has_no_graph_break_and_no_recompile_for_new_ids(method, tokens):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    model = adapter_model(method).eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    worst = 0.0
    with torch.no_grad():
        for ids in BATCHES:
            got = compiled(tokens, task_ids=torch.tensor(ids)).logits
            worst = max(worst, (got - model(tokens, task_ids=torch.tensor(ids)).logits).abs().max().item())
    assert counter.frame_count == 1, counter.frame_count
    assert worst <= 1e-6, worst
    torch._dynamo.reset()
