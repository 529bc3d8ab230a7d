"""DeepSpeed config and optimizer groups derived from the Layout, the optim section and the dtype
(no process group needed)."""
import torch

from gridtrain.parallel.config import OptimConfig
from gridtrain.parallel.ds_config import build_ds_config
from gridtrain.parallel.layout import Layout
from gridtrain.parallel.optim import build_optimizer, param_groups

OPTIM = OptimConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-7, weight_decay=0.05, grad_clip=0.7)


def layout(zero=0, pp=1, dp=1, global_batch=32, micro=2) -> Layout:
    return Layout(tp=1, pp=pp, dp=dp, zero_stage=zero, micro_batch_size=micro, global_batch_size=global_batch)


def test_batch_sizes_and_accumulation():
    ds = build_ds_config(layout(global_batch=32, micro=2, dp=4), OPTIM, "fp32")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 2, 4)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4


def test_clipping_is_deepspeeds_except_fp32_zero0():
    """fp32 ZeRO-0 clips in gridtrain.parallel.grad_clip (DeepSpeed's path miscounts under PP)."""
    assert build_ds_config(layout(zero=0), OPTIM, "fp32")["gradient_clipping"] == 0.0
    for zero in (1, 2, 3):
        assert build_ds_config(layout(zero=zero), OPTIM, "fp32")["gradient_clipping"] == 0.7
    assert build_ds_config(layout(zero=0), OPTIM, "bf16")["gradient_clipping"] == 0.7


def test_precision_and_zero_sections():
    ds = build_ds_config(layout(zero=3, dp=2), OPTIM, "bf16")
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    ds = build_ds_config(layout(zero=1, dp=2), OPTIM, "fp16")
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert ds["zero_optimization"] == {"stage": 1}


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in groups[1]["params"]} == {id(model[1].bias), id(model[2].weight), id(model[2].bias)}
    optimizer = build_optimizer(model, OPTIM)
    assert isinstance(optimizer, torch.optim.AdamW) and type(optimizer) is torch.optim.AdamW  # ZeRO's exact-type check
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-7
