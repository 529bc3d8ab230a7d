"""The optimizer of a run's optimizer section (gridtrain.parallel.config.OptimConfig).

The optimizer is torch.optim.AdamW handed to deepspeed.initialize: it needs no compiled DeepSpeed
op (FusedAdam / CPUAdam), so the same code runs on CPU and GPU, and ZeRO 1-3 accept it (it is on
DeepSpeed's list of tested ZeRO optimizers, matched by exact type). The LR schedule over it lives
in gridtrain.train.schedule."""
import torch

from gridtrain.parallel.config import OptimConfig


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
