"""DeepSpeed's config dict and the client optimizer, both derived from a RunConfig.

The optimizer is torch.optim.AdamW handed to deepspeed.initialize: it needs no compiled DeepSpeed
op (FusedAdam / CPUAdam), so the same code runs on CPU and GPU, and ZeRO 1-3 accept it (it is on
DeepSpeed's list of tested ZeRO optimizers, matched by exact type).
"""
import torch

from gridtrain.launcher.errors import ConfigError
from gridtrain.launcher.run_config import RunConfig


def grad_accum_steps(cfg: RunConfig, dp: int) -> int:
    """Micro-batches per rank per optimizer step: global batch / (micro batch x DP)."""
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise ConfigError([(
            "train.global_batch_size", cfg.train.global_batch_size,
            f"must be a multiple of train.micro_batch_size x data_parallel = {per_step}",
        )])
    return cfg.train.global_batch_size // per_step


def deepspeed_clips(cfg: RunConfig) -> bool:
    """Whether DeepSpeed's own gradient clipping is right for this run. Its fp32 ZeRO-0 path
    (clip_fp32_gradients) miscounts the norm under PP (see gridtrain.parallel.grad_clip) and never
    records it, so there gridtrain.parallel.grad_clip clips instead; ZeRO 1-3 and the
    bf16/fp16 optimizers compute the global norm correctly and report it."""
    return cfg.parallel.zero_stage > 0 or cfg.train.dtype != "fp32"


def build_ds_config(cfg: RunConfig, dp: int) -> dict:
    """The dict passed to deepspeed.initialize(config=...)."""
    stage = cfg.parallel.zero_stage
    if cfg.parallel.pipeline_parallel > 1 and stage > 1:
        raise ConfigError([(
            "parallel.zero_stage", stage,
            "use 0 or 1 with pipeline_parallel > 1: DeepSpeed's pipeline engine refuses ZeRO-2/3",
        )])
    zero = {"stage": stage}
    if stage == 3:
        # Partition every parameter, however small: memory then follows the ZeRO-3 formula, and
        # the layout-free weight gather (parallel.gather) sees one uniform case.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, dp),
        "gradient_clipping": cfg.optim.grad_clip if deepspeed_clips(cfg) else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.dtype == "bf16"},
        # loss_scale 0: dynamic loss scaling, the usual fp16 recipe
        "fp16": {"enabled": cfg.train.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
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


def build_optimizer(module: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    optim = cfg.optim
    return torch.optim.AdamW(param_groups(module, optim.weight_decay), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps)
