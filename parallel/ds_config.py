"""DeepSpeed's config dict and the client optimizer, from the run's Layout, its optimizer section
and its precision.

The optimizer is torch.optim.AdamW handed to deepspeed.initialize: it needs no compiled DeepSpeed
op (FusedAdam / CPUAdam), so the same code runs on CPU and GPU, and ZeRO 1-3 accept it (it is on
DeepSpeed's list of tested ZeRO optimizers, matched by exact type).
"""
import torch

from gridtrain.parallel.layout import Layout
from gridtrain.train.config import OptimConfig


def deepspeed_clips(zero_stage: int, dtype: str) -> bool:
    """Whether DeepSpeed's own gradient clipping is right for this run. Its fp32 ZeRO-0 path
    (clip_fp32_gradients) miscounts the norm under PP (see gridtrain.parallel.grad_clip) and never
    records it, so there gridtrain.parallel.grad_clip clips instead; ZeRO 1-3 and the
    bf16/fp16 optimizers compute the global norm correctly and report it."""
    return zero_stage > 0 or dtype != "fp32"


def build_ds_config(layout: Layout, optim: OptimConfig, dtype: str) -> dict:
    """The dict passed to deepspeed.initialize(config=...). The layout's rules (ZeRO with
    pipelines, whole micro-batches per DP rank) were checked when it was built."""
    stage = layout.zero_stage
    zero = {"stage": stage}
    if stage == 3:
        # Partition every parameter, however small: memory then follows the ZeRO-3 formula, and
        # every parameter is saved in the ZeRO-3 partitions the checkpoint reader merges.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        "gradient_clipping": optim.grad_clip if deepspeed_clips(stage, dtype) else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        # loss_scale 0: dynamic loss scaling, the usual fp16 recipe
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": None,  # gridtrain.train.metrics logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (linear and embedding weights), none on biases and
    norm weights (every parameter with fewer than 2 dimensions), as GPT-2/Megatron do."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(module: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(module, optim.weight_decay), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps)
