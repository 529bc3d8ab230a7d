"""ZeRO per-rank memory against the paper's numbers worked by hand, and the TP/PP sharding of the
parameter count against the analytic total of gridtrain.model.flops."""
import pytest

from gridtrain.model.config import ModelConfig
from gridtrain.model.flops import count_parameters
from gridtrain.parallel.memory_estimate import (
    layer_parameters_per_tp_rank,
    partition_balanced,
    partition_uniform,
    stage_parameters_per_rank,
    zero_memory_per_rank,
)

P, DP = 1000, 4


# (weights, gradients, optimizer) bytes per rank for P=1000 params, DP=4.
@pytest.mark.parametrize("dtype, stage, expected", [
    # Mixed precision, the paper's Figure 1: 2P + 2P + 12P, partitioned stage by stage.
    ("bf16", 0, (2000, 2000, 12000)),
    ("bf16", 1, (2000, 2000, 3000)),
    ("fp16", 2, (2000, 500, 3000)),
    ("bf16", 3, (500, 500, 3000)),
    # fp32: plain AdamW at stage 0 holds only the moments; DeepSpeed's ZeRO optimizer adds a fp32 copy.
    ("fp32", 0, (4000, 4000, 8000)),
    ("fp32", 1, (4000, 4000, 3000)),
    ("fp32", 2, (4000, 1000, 3000)),
    ("fp32", 3, (1000, 1000, 3000)),
])
def test_zero_memory_per_stage(dtype, stage, expected):
    memory = zero_memory_per_rank(P, DP, stage, dtype)
    assert (memory["weights"], memory["gradients"], memory["optimizer"]) == expected
    assert memory["total"] == sum(expected)
    assert memory["optimizer"] == memory["master_weights"] + memory["adam_moments"]


def test_paper_example_7_5b_on_64_gpus():
    # ZeRO paper, Figure 1: 7.5B params, Nd=64: 120 GB baseline, 31.4 GB (Pos), 16.6 GB (Pos+g), 1.9 GB (Pos+g+p).
    gb = [zero_memory_per_rank(7_500_000_000, 64, stage, "fp16")["total"] / 1e9 for stage in range(4)]
    assert gb == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.06)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tp_shards_sum_to_the_full_model(family):
    cfg = ModelConfig(family=family, vocab_size=1000, hidden_size=64, num_layers=3, num_attention_heads=8,
                      num_kv_heads=4 if family == "llama" else None, max_seq_len=32)
    full = count_parameters(cfg, tensor_parallel=2)
    assert stage_parameters_per_rank(cfg, 1, 1) == [count_parameters(cfg, 1)]
    per_rank = stage_parameters_per_rank(cfg, 2, 1)[0]
    h = cfg.hidden_size
    replicated = (cfg.max_seq_len * h + 2 * h + cfg.num_layers * (h + h + 4 * h)) if family == "gpt2" \
        else h + cfg.num_layers * 2 * h  # positions, norms and row-parallel biases sit on every TP rank
    assert 2 * per_rank - replicated == full


def test_pipeline_stages_cover_every_layer_once_plus_the_tied_copy():
    cfg = ModelConfig(family="gpt2", vocab_size=1000, hidden_size=64, num_layers=6, num_attention_heads=8, max_seq_len=32)
    layers = layer_parameters_per_tp_rank(cfg, 1)
    stages = stage_parameters_per_rank(cfg, 1, 2)
    assert sum(stages) == count_parameters(cfg) + layers[0]  # the last stage holds the tied embedding again
    assert sum(stage_parameters_per_rank(cfg, 1, 2, "uniform")) == sum(stages)


def test_partitions_match_deepspeed():
    from deepspeed.runtime.utils import partition_balanced as ds_balanced
    from deepspeed.runtime.utils import partition_uniform as ds_uniform

    for weights, parts in [([5, 1, 1, 1, 1, 5], 2), ([9, 3, 3, 3, 3, 3, 3, 1, 9], 4), ([1, 2], 3), ([7] * 10, 3)]:
        assert partition_balanced(weights, parts) == list(ds_balanced(weights, parts))
        assert partition_uniform(len(weights), parts) == list(ds_uniform(len(weights), parts))


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        zero_memory_per_rank(P, DP, 4, "fp32")
    with pytest.raises(ValueError):
        zero_memory_per_rank(P, DP, 1, "int8")
