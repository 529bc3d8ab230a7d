"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay to min_lr, with
Megatron's formulas (megatron/core/optimizer_param_scheduler.py, init_lr = 0)."""
import math

from gridtrain.errors import ConfigError
from gridtrain.parallel.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """LR of optimizer step `step`, counted from 1 (the first update is step 1, the last is
    `total_steps`). Warmup climbs linearly to optim.lr at step warmup_steps; decay then runs from
    warmup_steps to decay_steps (default: total_steps) and holds min_lr afterwards.

    Counting from 1 keeps Megatron's formula while never spending an update at LR 0 (Megatron
    evaluates its first step at num_steps=0)."""
    warmup = optim.warmup_steps
    if warmup > 0 and step <= warmup:
        return optim.lr * step / warmup
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = optim.decay_steps if optim.decay_steps is not None else total_steps
    if step > decay_steps or decay_steps <= warmup:
        return optim.min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    if optim.schedule == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    elif optim.schedule == "linear":
        coeff = 1.0 - ratio
    else:
        raise ConfigError([("optim.schedule", optim.schedule, "use one of cosine, linear, constant")])
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)
