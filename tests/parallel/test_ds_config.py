"""DeepSpeed config and optimizer groups derived from a RunConfig (no process group needed)."""
import pytest
import torch

from gridtrain.launcher.errors import ConfigError
from gridtrain.launcher.run_config import RunConfig
from gridtrain.parallel.config import ParallelConfig
from gridtrain.parallel.ds_config import build_ds_config, build_optimizer, param_groups
from gridtrain.train.config import OptimConfig, TrainConfig


def config(zero=0, pp=1, dtype="fp32", global_batch=32, micro=2) -> RunConfig:
    return RunConfig(
        parallel=ParallelConfig(pipeline_parallel=pp, zero_stage=zero),
        optim=OptimConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-7, weight_decay=0.05, grad_clip=0.7),
        train=TrainConfig(global_batch_size=global_batch, micro_batch_size=micro, dtype=dtype),
    )


def test_batch_sizes_and_accumulation():
    ds = build_ds_config(config(global_batch=32, micro=2), dp=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 2, 4)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4


def test_clipping_is_deepspeeds_except_fp32_zero0():
    """fp32 ZeRO-0 clips in gridtrain.parallel.grad_clip (DeepSpeed's path miscounts under PP)."""
    assert build_ds_config(config(zero=0), dp=1)["gradient_clipping"] == 0.0
    for zero in (1, 2, 3):
        assert build_ds_config(config(zero=zero), dp=1)["gradient_clipping"] == 0.7
    assert build_ds_config(config(zero=0, dtype="bf16"), dp=1)["gradient_clipping"] == 0.7


def test_precision_and_zero_sections():
    ds = build_ds_config(config(zero=3, dtype="bf16"), dp=2)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    ds = build_ds_config(config(zero=1, dtype="fp16"), dp=2)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert ds["zero_optimization"] == {"stage": 1}


def test_zero2_with_pipeline_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as err:
        build_ds_config(config(zero=2, pp=2), dp=1)
    assert str(err.value) == ("parallel.zero_stage=2: use 0 or 1 with pipeline_parallel > 1: "
                              "DeepSpeed's pipeline engine refuses ZeRO-2/3")


def test_global_batch_not_divisible():
    with pytest.raises(ConfigError) as err:
        build_ds_config(config(global_batch=30, micro=4), dp=2)
    assert str(err.value) == "train.global_batch_size=30: must be a multiple of train.micro_batch_size x data_parallel = 8"


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in groups[1]["params"]} == {id(model[1].bias), id(model[2].weight), id(model[2].bias)}
    optimizer = build_optimizer(model, config())
    assert isinstance(optimizer, torch.optim.AdamW) and type(optimizer) is torch.optim.AdamW  # ZeRO's exact-type check
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-7
