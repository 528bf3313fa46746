"""Exact initialisation, dtypes/devices, merge, fast-path choice, task-id handling and error messages of the
adapter layers (what `make mutate` found unchecked by the formula tests in test_layers.py / test_fused.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import rlora
from rlora.layers import LAYERS, AdapterError
from rlora.layers.dropout import dropout, keep_mask
from rlora.layers.fused import DroppedDownProjection, RoutedDroppedDownProjection, down_project, routed_down_project

D_IN, D_OUT, R, N, TASKS = 12, 20, 4, 3, ["a", "b", "c"]
METHODS = ["lora", "hydra", "rlora", "mtl"]


def cfg(method, **kw):
    return rlora.AdapterConfig(method=method, r=R, num_heads=N, alpha=8, tasks=TASKS, **{"dropout": 0.0, **kw})


def trained(layer):
    """Give every adapter tensor a non-trivial value (B starts at zero)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base"):
                p.normal_(0, 0.3)
    return layer


# ---------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("method", ["lora", "hydra", "rlora", "align"])
def test_num_tasks_defaults_to_zero_and_is_passed_through(method):
    base = torch.nn.Linear(D_IN, D_OUT)
    assert LAYERS[method](base, cfg(method)).num_tasks == 0
    assert LAYERS[method](base, cfg(method), num_tasks=3).num_tasks == 3


def test_mtl_needs_at_least_one_task():
    base = torch.nn.Linear(D_IN, D_OUT)
    msg = "^adapter.method=mtl needs the task list: set adapter.tasks \\(e.g. from data.path\\)$"
    with pytest.raises(AdapterError, match=msg):
        LAYERS["mtl"](base, cfg("mtl"))
    one = LAYERS["mtl"](base, cfg("mtl"), num_tasks=1)
    assert one.task_weight.shape == (1, N)


def test_only_an_nn_linear_can_be_wrapped():
    with pytest.raises(AdapterError, match="^Conv1d is not an nn.Linear$"):
        LAYERS["lora"](torch.nn.Conv1d(2, 2, 1), cfg("lora"))


@pytest.mark.parametrize("method", METHODS)
def test_adapter_tensors_take_the_base_dtype(method):
    base = torch.nn.Linear(D_IN, D_OUT).double()
    layer = LAYERS[method](base, cfg(method), num_tasks=3)
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        assert t.dtype == torch.float64, name
    if method == "mtl":
        assert layer.mixing().dtype == torch.float64
    if method == "rlora":
        assert layer.initial_B.dtype == torch.float64


@pytest.mark.parametrize("method,kw", [(m, {}) for m in METHODS] + [("mtl", {"diagonal": True})])
def test_a_meta_base_gets_its_adapter_on_cpu(method, kw):
    """ZeRO-3 / empty-init builds the model under a meta device context: the adapter is made on CPU."""
    with torch.device("meta"):
        base = torch.nn.Linear(D_IN, D_OUT)
        layer = LAYERS[method](base, cfg(method, **kw), num_tasks=3)
    assert base.weight.device.type == "meta"
    for name, t in layer.named_parameters():
        if not name.startswith("base"):
            assert t.device.type == "cpu", name


def test_kaiming_init_bounds_are_one_over_sqrt_fan_in():
    """A, Hydra's router and MTL's task weights: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) drawn in that order from the seeded generator."""
    base = torch.nn.Linear(D_IN, D_OUT)
    for method, second in [("lora", None), ("hydra", ("router", (N, D_IN))), ("mtl", ("task_weight", (3, N)))]:
        torch.manual_seed(5)
        layer = LAYERS[method](base, cfg(method), num_tasks=3)
        torch.manual_seed(5)
        a_ref = torch.empty(R, D_IN).uniform_(-1 / math.sqrt(D_IN), 1 / math.sqrt(D_IN))
        assert torch.equal(layer.lora_A.detach(), a_ref), method
        if second:
            name, shape = second
            ref = torch.empty(shape).uniform_(-1 / math.sqrt(shape[1]), 1 / math.sqrt(shape[1]))
            assert torch.allclose(getattr(layer, name).detach(), ref, atol=1e-7), method


def test_rlora_keeps_a_plain_copy_of_the_initial_heads():
    layer = LAYERS["rlora"](torch.nn.Linear(D_IN, D_OUT), cfg("rlora"), num_tasks=0)
    assert torch.equal(layer.initial_B, layer.lora_B.detach())
    names = {n for n, _ in layer.named_parameters()} | {n for n, _ in layer.named_buffers()}
    assert "initial_B" not in names
    with torch.no_grad():
        layer.lora_B.add_(1.0)
    assert not torch.equal(layer.initial_B, layer.lora_B.detach())


# ---------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("method,kw,task", [("lora", {}, None), ("mtl", {}, 1), ("mtl", {"diagonal": True}, 2)])
def test_merged_forward_equals_the_adapter_forward(method, kw, task):
    torch.manual_seed(0)
    layer = trained(LAYERS[method](torch.nn.Linear(D_IN, D_OUT), cfg(method, **kw), num_tasks=3)).eval()
    x = torch.randn(2, 5, D_IN)
    with rlora.task_ids(task if task is not None else 0):
        want = layer(x)
    delta = layer.delta_weight(task)
    if method == "lora":
        assert torch.allclose(delta, layer.scaling * layer.lora_B[:, 0] @ layer.lora_A, atol=1e-6)
    w0 = layer.base.weight.detach().clone()
    layer.merge(task)
    assert layer.merged_task == (task if task is not None else True)
    assert torch.allclose(layer.base.weight, w0 + delta, atol=1e-6)
    assert torch.allclose(layer(x), want, atol=1e-5)                 # no task ids needed once merged
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0) and layer.merged_task is None


def test_merging_twice_is_an_error_and_unmerge_restores_w0_once():
    torch.manual_seed(0)
    layer = trained(LAYERS["lora"](torch.nn.Linear(D_IN, D_OUT), cfg("lora")))
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    merged = layer.base.weight.detach().clone()
    already = r"^adapter is already merged: call rlora.unmerge\(model\) first$"
    with pytest.raises(AdapterError, match=already):
        layer.merge()
    assert torch.equal(layer.base.weight, merged) and layer.merged_task is True      # the failed merge: no change
    assert not layer.base.weight.requires_grad and layer.base.weight.grad_fn is None
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0) and layer._w0_backup is None
    layer.unmerge()                                                                 # not merged: a no-op
    assert torch.equal(layer.base.weight, w0) and layer.merged_task is None
    layer.merge(0)                                                                  # task 0 is a task, not "no task"
    assert layer.merged_task == 0 and layer.merged_task is not True


def test_merge_errors():
    mtl = LAYERS["mtl"](torch.nn.Linear(D_IN, D_OUT), cfg("mtl"), num_tasks=3)
    with pytest.raises(AdapterError, match=r"^merging an MTL-LoRA adapter needs a task: rlora.merge\(model, task=NAME\)$"):
        mtl.delta_weight(None)
    hydra = LAYERS["hydra"](torch.nn.Linear(D_IN, D_OUT), cfg("hydra"))
    with pytest.raises(AdapterError, match="^hydra routes each token through its heads with input-dependent gates, so "
                                           "it cannot be merged exactly into W0; use `rlora export --format "
                                           r"peft\|merged` for the approximate export$"):
        hydra.merge()


# ---------------------------------------------------------------------------------------- MTL task ids
def test_one_task_id_serves_every_sample_and_1d_input_is_one_sample():
    torch.manual_seed(0)
    layer = trained(LAYERS["mtl"](torch.nn.Linear(D_IN, D_OUT), cfg("mtl"), num_tasks=3)).eval()
    for batch in (2, 4):
        x = torch.randn(batch, 3, D_IN)
        with rlora.task_ids(2):
            one = layer(x)
        with rlora.task_ids([2] * batch):
            each = layer(x)
        assert torch.equal(one, each)
    v = torch.randn(D_IN)
    with rlora.task_ids(1):
        assert torch.allclose(layer(v), layer(v.unsqueeze(0))[0], atol=1e-6)


def test_mtl_task_id_messages():
    layer = LAYERS["mtl"](torch.nn.Linear(D_IN, D_OUT), cfg("mtl"), num_tasks=3)
    x = torch.randn(2, D_IN)
    with pytest.raises(AdapterError, match="^MTL-LoRA needs per-sample task ids") as err:
        layer(x)
    assert str(err.value) == (
        "MTL-LoRA needs per-sample task ids and none reached this layer: pass `task_ids=` to the model or wrap the "
        "call in `with rlora.task_ids(ids):`; under Hugging Face Trainer, which drops a `task_ids` column the "
        "model's forward does not name, train rlora.get_adapter_model(model, config) instead of the bare injected "
        "model")
    with rlora.task_ids([-1, 0]), pytest.raises(
            AdapterError, match=r"^task id -1 is out of range: the adapter has 3 tasks \(ids 0..2\)$"):
        layer(x)
    with rlora.task_ids([0, 3]), pytest.raises(AdapterError, match=r"^task id 3 is out of range: .* \(ids 0..2\)$"):
        layer(x)


def test_mtl_dropout_acts_in_training_only():
    torch.manual_seed(0)
    layer = trained(LAYERS["mtl"](torch.nn.Linear(D_IN, D_OUT), cfg("mtl", dropout=0.5), num_tasks=3))
    x = torch.randn(2, 4, D_IN)
    with rlora.task_ids([0, 1]):
        train = layer.train()(x)
        evaluated = layer.eval()(x)
        assert torch.equal(layer(x), evaluated)                       # eval: deterministic
    assert not torch.allclose(train, evaluated, atol=1e-3)


# ---------------------------------------------------------------------------------------- dropout / fused paths
def test_dropout_off_draws_no_random_numbers():
    """p = 0 in training (and any p in eval) is the identity and leaves the generator where it was, for every
    method (the fused CPU paths only run with p > 0)."""
    x = torch.randn(6, D_IN)
    for method in METHODS:
        layer = trained(LAYERS[method](torch.nn.Linear(D_IN, D_OUT), cfg(method), num_tasks=3)).train()
        torch.manual_seed(1)
        state = torch.get_rng_state()
        with rlora.task_ids(0):
            layer(x)
        assert torch.equal(torch.get_rng_state(), state), method
    A = torch.randn(R, D_IN)
    state = torch.get_rng_state()
    assert torch.equal(down_project(x, A, 0.0, True, 2.0), (x @ A.t()) * 2.0)
    assert torch.equal(torch.get_rng_state(), state)


def test_keep_mask_at_p_one_keeps_one_in_2_15():
    """p = 1 is capped at k = 2^15 - 1: threshold 2k - 2^15 = 2^15 - 2, keep probability 2 / 2^16, scale 2^15."""
    mask, scale = keep_mask(torch.Size([64]), 1.0, torch.float32, torch.device("cpu"))
    assert scale == 2.0 ** 15 and mask.shape == (64,)


@pytest.mark.parametrize("n", [8, 9, 12])
def test_keep_mask_draws_exactly_ceil_n_over_4_integers(n):
    """Four 16-bit slices per 64-bit draw: the mask is the first n slices, and the generator advances by
    ceil(n / 4) draws (so what comes after the dropout is reproducible too)."""
    p = 0.3
    k = round(p * 2 ** 15)
    torch.manual_seed(3)
    mask, _ = keep_mask(torch.Size([n]), p, torch.float32, torch.device("cpu"))
    after = torch.rand(3)
    torch.manual_seed(3)
    draws = torch.empty(math.ceil(n / 4), dtype=torch.int64).random_(-2 ** 63, None)
    expected = (draws.view(torch.int16)[:n] >= 2 * k - 2 ** 15).float()
    assert torch.equal(mask, expected)
    assert torch.equal(torch.rand(3), after)


def test_cpu_dropout_follows_the_input_device_not_the_default_device():
    x = torch.randn(4, D_IN)
    A, Rt = torch.randn(R, D_IN), torch.randn(N, D_IN)
    with torch.device("meta"):
        assert dropout(x, 0.5, True).device.type == "cpu"
        assert down_project(x, A, 0.5, True).device.type == "cpu"
        z, logits = routed_down_project(x, A, Rt, 0.5, True)
        assert z.device.type == logits.device.type == "cpu"


class DropoutCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.dropout:
            self.calls.append((args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def test_other_devices_use_torch_dropout_with_p_and_training():
    """Off the CPU (a meta tensor stands in for an accelerator here) both entry points call F.dropout(x, p, True)."""
    x = torch.randn(4, D_IN, device="meta")
    A = torch.randn(R, D_IN, device="meta")
    with DropoutCalls() as mode:
        assert dropout(x, 0.25, True).shape == x.shape
        assert down_project(x, A, 0.25, True, 3.0).shape == (4, R)
    assert len(mode.calls) == 2
    for args, kwargs in mode.calls:
        assert args == (x,) and kwargs["p"] == 0.25 and kwargs["training"] is True


def test_fused_paths_are_taken_exactly_when_documented():
    x, A, Rt = torch.randn(5, D_IN), torch.randn(R, D_IN), torch.randn(N, D_IN)
    x.requires_grad_(True)

    def node(t):
        return type(t.grad_fn).__name__

    z, logits = routed_down_project(x, A, Rt, 0.1, True)
    assert "RoutedDroppedDownProjection" in node(z) and node(z) == node(logits)
    for args in [(x.bfloat16(), A.bfloat16(), Rt.bfloat16(), 0.1, True), (x, A, Rt.double(), 0.1, True),
                 (x, A.double(), Rt, 0.1, True), (x.double(), A, Rt, 0.1, True)]:
        z, _ = routed_down_project(*args)
        assert "RoutedDroppedDownProjection" not in node(z)
    for p, training in [(0.0, True), (0.1, False)]:
        z, _ = routed_down_project(x, A, Rt, p, training)
        assert "DroppedDownProjection" not in node(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, _ = routed_down_project(x, A, Rt, 0.1, True)
    assert "Routed" not in node(z) and "DroppedDownProjection" in node(z)


def test_rlora_router_logits_share_the_matmul_in_fp32_only():
    """fp32 without autocast: the router's logits come from the shared matmul, ``gates`` is not called;
    under autocast they come from ``gates`` (fp32 softmax)."""
    layer = trained(LAYERS["rlora"](torch.nn.Linear(D_IN, D_OUT), cfg("rlora"))).eval()
    calls = []
    original = layer.gates
    layer.gates = lambda x: calls.append(1) or original(x)
    x = torch.randn(4, D_IN)
    fp32 = layer(x)
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert calls == [1] and low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), fp32, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("cls, n_in", [(DroppedDownProjection, 2), (RoutedDroppedDownProjection, 3)])
def test_fused_backward_with_one_input_needing_a_gradient(cls, n_in):
    """Each input's gradient is formed only when that input needs one, and then equals plain autograd."""
    torch.manual_seed(0)
    x, A, Rt = torch.randn(5, D_IN), torch.randn(R, D_IN), torch.randn(N, D_IN)
    m = (torch.rand(5, D_IN) > 0.3).float()
    tensors = [x, A, Rt][:n_in]
    for which in range(n_in):
        leaves = [t.clone().requires_grad_(k == which) for k, t in enumerate(tensors)]
        args = (*leaves, m, 1.7) if cls is DroppedDownProjection else (*leaves, m, 1.7)
        out = cls.apply(*args)
        loss = (out[0].sum() + out[1].square().sum()) if isinstance(out, tuple) else out.square().sum()
        loss.backward()
        ref = [t.clone().requires_grad_(k == which) for k, t in enumerate(tensors)]
        z = (ref[0] * m) @ ref[1].t() * 1.7
        ref_loss = (z.sum() + (ref[0] @ ref[2].t()).square().sum()) if n_in == 3 else z.square().sum()
        ref_loss.backward()
        for k in range(n_in):
            if k == which:
                assert torch.allclose(leaves[k].grad, ref[k].grad, atol=1e-5), (cls.__name__, k)
            else:
                assert leaves[k].grad is None


def test_drop_is_the_layers_input_dropout():
    layer = LAYERS["lora"](torch.nn.Linear(D_IN, D_OUT), cfg("lora", dropout=0.5))
    x = torch.randn(6, D_IN)
    assert layer.eval().drop(x) is x
    torch.manual_seed(2)
    got = layer.train().drop(x)
    torch.manual_seed(2)
    assert torch.equal(got, dropout(x, 0.5, True)) and not torch.equal(got, x)


@pytest.mark.parametrize("method", ["hydra", "rlora"])
def test_a_bf16_layer_keeps_its_rank_features_in_bf16(method):
    """The router's softmax runs in fp32, then the gates are cast to the input's dtype: a bf16 layer's rank
    features u [T, N*r] are bf16 (not promoted to fp32 by the gates), and its output is close to fp32's."""
    torch.manual_seed(0)
    layer = trained(LAYERS[method](torch.nn.Linear(D_IN, D_OUT), cfg(method)))
    x = torch.randn(4, D_IN)
    ref = layer(x)
    low = layer.to(torch.bfloat16)
    assert low.rank_features(x.bfloat16()).dtype == torch.bfloat16
    assert torch.allclose(low(x.bfloat16()).float(), ref, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------------------- Align-LoRA
class _AlignRoot(torch.nn.Module):
    """What rlora.alignment.record_alignment looks for: a module in training mode carrying an align config."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.rlora_config = layer, cfg("align")


def test_align_layer_hands_its_rank_features_to_the_open_recorder():
    from rlora.alignment import record_alignment

    torch.manual_seed(0)
    layer = trained(LAYERS["align"](torch.nn.Linear(D_IN, D_OUT), cfg("align"))).train()
    assert type(layer.align_memory) is dict and layer.align_memory == {}
    x = torch.randn(2, 5, D_IN)
    with record_alignment(_AlignRoot(layer), torch.ones(2, 5), torch.tensor([0, 1])) as rec:
        out = layer(x)
    (key, parts), = rec.features.items()
    want = layer.scaling * x.reshape(-1, D_IN) @ layer.lora_A.detach().t()              # u = s A x  [10, r]
    assert key is layer and len(parts) == 1 and torch.allclose(parts[0], want, atol=1e-6)
    assert torch.allclose(out, layer.base(x) + want.view(2, 5, R) @ layer.lora_B[:, 0].detach().t(), atol=1e-5)

