"""Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""
import torch
from megatron.core import ModelParallelConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from gridtrain.model.attention import SelfAttention, local_project
from gridtrain.model.config import ModelConfig
from gridtrain.model.mlp import MLP
from gridtrain.model.norms import build_norm

Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden (B,T,h), position_ids, segment_ids


class Block(nn.Module):
    """One decoder layer. Takes and returns the pipeline activation tuple, so DeepSpeed's
    PipelineModule can call it as a stage layer. With activation checkpointing, only the block's
    input is kept and the block is recomputed in backward (no dropout, so recompute is exact)."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, segment_mask: bool):
        super().__init__()
        self.attn_norm = build_norm(cfg)
        self.attn = SelfAttention(cfg, mp_config, segment_mask)
        self.mlp_norm = build_norm(cfg)
        self.mlp = MLP(cfg, mp_config)
        self.activation_checkpointing = cfg.activation_checkpointing

    def _hidden(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), position_ids, segment_ids)
        return x + self.mlp(self.mlp_norm(x))

    def forward_cached(self, x: torch.Tensor, position_ids: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """Inference at TP = 1 with a KV cache (see SelfAttention.forward_cached): x (B, T, h) -> (B, T, h)."""
        x = x + self.attn.forward_cached(self.attn_norm(x), position_ids, cache, layer)
        return x + self.mlp(self.mlp_norm(x), local_project)

    def forward(self, inputs: Activations) -> Activations:
        x, position_ids, segment_ids = inputs
        if self.activation_checkpointing and torch.is_grad_enabled():
            x = checkpoint(self._hidden, x, position_ids, segment_ids, use_reentrant=False)
        else:
            x = self._hidden(x, position_ids, segment_ids)
        return x, position_ids, segment_ids
