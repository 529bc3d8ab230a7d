"""LayerNorm (gpt2) and RMSNorm (llama); NVIDIA apex's fused kernels when usable, else torch."""
import functools

import torch
from torch import nn

from gridtrain.model.config import ModelConfig


@functools.lru_cache(maxsize=1)
def _apex_norms():
    """apex's fused norms, or None. They are CUDA kernels, so CPU runs always use torch."""
    if not torch.cuda.is_available():
        return None
    try:
        from apex.normalization import FusedLayerNorm, FusedRMSNorm
    except ImportError:  # apex is not on PyPI; clusters that built it get the fused path
        return None
    return FusedLayerNorm, FusedRMSNorm


def norm_implementation() -> str:
    """"apex" or "torch": which norm kernels this process uses (for `gridtrain env` and logs)."""
    return "apex" if _apex_norms() is not None else "torch"


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / rms(x) * weight, the statistics in fp32 whatever the input dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., h) -> (..., h), over the last dimension; `weight` stands in for self.weight (a
        view of it that communicates its gradient, see SelfAttention._head_norm)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight if weight is None else weight) * normed.type_as(x)


def build_norm(cfg: ModelConfig) -> nn.Module:
    """The family's norm over the hidden size, weight one (and bias zero for LayerNorm).

    Norm parameters are replicated across TP ranks; their gradients agree across TP because the
    input gradient of every ColumnParallelLinear is all-reduced."""
    apex = _apex_norms()
    if cfg.family == "gpt2":
        cls = apex[0] if apex else nn.LayerNorm
        return cls(cfg.hidden_size, eps=cfg.norm_eps)
    if apex:
        return apex[1](cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps)
