"""Equal parameter budgets (rlora/compare/budget.py) on the tiny Llama: hidden 32, MLP 64, 2 layers,
adapters on q_proj (32->32), v_proj (32->16, 2 KV heads of 8) and down_proj (64->32)."""
from helpers import run_config

from rlora.compare.budget import lora_rank, parameter_counts

SUM_IN_OUT = 2 * ((32 + 32) + (32 + 16) + (64 + 32))           # LoRA's A+B per unit of rank: 416


def cfg(tiny_model_dir, tmp_path, method="rlora", r=4, heads=2):
    return run_config(tiny_model_dir, tmp_path, tmp_path, adapter__method=method, adapter__r=r,
                      adapter__num_heads=heads)


def test_counts_are_the_injected_parameters(tiny_model_dir, tmp_path):
    ab = 4 * 2 * ((32 + 2 * 32) + (32 + 2 * 16) + (64 + 2 * 32))  # r (d_in + N d_out), 2 layers: 2304
    router = 2 * 2 * (32 + 32 + 64)                                # N d_in per module: 512
    assert parameter_counts(cfg(tiny_model_dir, tmp_path)) == {"ab": ab, "total": ab + router}
    assert parameter_counts(cfg(tiny_model_dir, tmp_path, method="lora", r=7)) == {"ab": 7 * SUM_IN_OUT,
                                                                                   "total": 7 * SUM_IN_OUT}


def test_ab_matches_shared_a_and_b(tiny_model_dir, tmp_path):
    # round(2304 / 416) = round(5.54) = 6
    assert lora_rank(cfg(tiny_model_dir, tmp_path), ["lora", "hydra", "rlora"], "ab") == 6


def test_total_gives_lora_at_least_every_method_s_trainable_parameters(tiny_model_dir, tmp_path):
    """`--budget total`: routers included, so LoRA's rank rises (2816 / 416 = 6.77 -> 7), and never below."""
    c = cfg(tiny_model_dir, tmp_path)
    rank = lora_rank(c, ["lora", "hydra", "rlora"], "total")
    largest = parameter_counts(c)["total"]
    assert rank == 7 and rank * SUM_IN_OUT >= largest > (rank - 1) * SUM_IN_OUT
    # a fraction under one half is still rounded up: LoRA never trains fewer parameters
    c1 = cfg(tiny_model_dir, tmp_path, r=3)   # A+B 1728 + router 512 = 2240 -> 5.38: rank 6, not 5
    assert parameter_counts(c1)["total"] == 2240
    assert lora_rank(c1, ["lora", "hydra"], "total") == 6


def test_lora_alone_keeps_its_rank(tiny_model_dir, tmp_path):
    assert lora_rank(cfg(tiny_model_dir, tmp_path, method="lora", r=5), ["lora"], "total") == 5


def test_rank_one_and_the_callers_config_is_left_alone(tiny_model_dir, tmp_path):
    c = cfg(tiny_model_dir, tmp_path, method="lora", r=1, heads=1)
    assert lora_rank(c, ["lora", "hydra"], "ab") == 1       # hydra's A+B at r = N = 1 is one rank of LoRA
    assert (c.adapter.method, c.adapter.r) == ("lora", 1)   # the methods are counted on copies
