"""The Layout and its rules, the one place that derives DP and checks the split (no torch)."""
import pytest

from gridtrain.errors import ConfigError
from gridtrain.parallel.config import ParallelConfig
from gridtrain.parallel.layout import Layout, build_layout, configured_world_size, data_parallel_size


def test_derived_numbers():
    layout = build_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 2, 32, world_size=8)
    assert (layout.tp, layout.pp, layout.dp, layout.world_size) == (2, 2, 2, 8)
    assert layout.grad_accum_steps == 8  # 32 samples / (2 per micro-batch x 2 DP ranks)
    assert layout.pipeline_bubble == pytest.approx(1 / 9)  # (p-1)/(m+p-1)
    assert layout.describe() == "TP 2 x PP 2 x DP 2, ZeRO 0"
    assert layout.record() == {"world_size": 8, "tp": 2, "pp": 2, "dp": 2, "zero_stage": 0}


def test_data_parallel_degree_from_the_world_or_the_config():
    free = ParallelConfig(tensor_parallel=2)
    assert free.data_parallel == "auto"  # the default: the world decides
    assert data_parallel_size(free, 8) == 4 and data_parallel_size(free, None) == 1
    assert data_parallel_size(ParallelConfig(tensor_parallel=2, data_parallel=None), 8) == 4  # null: the same
    assert configured_world_size(free) == 2
    fixed = ParallelConfig(tensor_parallel=2, data_parallel=3)
    assert data_parallel_size(fixed, None) == 3 and configured_world_size(fixed) == 6
    assert build_layout(free, 1, 4, None).dp == 1 and build_layout(free, 1, 4, 8).dp == 4


def test_zero2_with_pipeline_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as err:
        build_layout(ParallelConfig(pipeline_parallel=2, zero_stage=2), 2, 32, world_size=2)
    assert str(err.value) == ("parallel.zero_stage=2: DeepSpeed's pipeline engine refuses ZeRO-2/3 with "
                              "parallel.pipeline_parallel (2) > 1; use zero_stage 0 or 1 with pipelines, or "
                              "pipeline_parallel 1 for ZeRO-2/3")


def test_global_batch_not_divisible():
    with pytest.raises(ConfigError) as err:
        build_layout(ParallelConfig(), 4, 30, world_size=2)
    assert str(err.value) == ("train.global_batch_size=30: must be a multiple of train.micro_batch_size (4) x "
                              "data_parallel (2) = 8: every DP rank accumulates whole micro-batches; use 24 or "
                              "32, or change micro_batch_size")


def test_world_size_mismatch_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        build_layout(ParallelConfig(tensor_parallel=2, data_parallel=3, pipeline_parallel=2, zero_stage=3), 2, 31, 4)
    assert [field for field, _, _ in err.value.problems] == ["world_size", "parallel.zero_stage",
                                                             "train.global_batch_size"]
    assert Layout(1, 1, 1, 0, 1, 1).world_size == 1
