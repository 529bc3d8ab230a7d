"""Causal self-attention with grouped-query heads, the heads split across tensor-parallel ranks."""
import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from gridtrain.model.config import ModelConfig
from gridtrain.model.init import normal_init
from gridtrain.model.rotary import apply_rotary, rotary_cos_sin


class SelfAttention(nn.Module):
    """q, k, v are separate ColumnParallelLinears and o a RowParallelLinear, so TP rank r holds the
    contiguous heads [r*H/tp, (r+1)*H/tp) and kv heads [r*KV/tp, (r+1)*KV/tp): the full weights are
    the same at any TP, and each local query head's kv head is local too. gpt2 has biases and learned
    positions (added by the embedding); llama has no biases and rotates q and k (RoPE)."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, segment_mask: bool):
        super().__init__()
        self.cfg, self.segment_mask = cfg, segment_mask
        h, d = cfg.hidden_size, cfg.head_dim
        bias = cfg.family == "gpt2"
        init = normal_init(cfg.init_std)
        # GPT-2 / Megatron: residual-branch outputs scaled by 1/sqrt(2 * num_layers).
        out_init = normal_init(cfg.init_std / math.sqrt(2.0 * cfg.num_layers))
        column = dict(config=mp_config, init_method=init, bias=bias, gather_output=False)
        self.q_proj = ColumnParallelLinear(h, cfg.num_attention_heads * d, **column)
        self.k_proj = ColumnParallelLinear(h, cfg.kv_heads * d, **column)
        self.v_proj = ColumnParallelLinear(h, cfg.kv_heads * d, **column)
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * d, h, config=mp_config, init_method=out_init, bias=bias,
            input_is_parallel=True, skip_bias_add=False,
        )
        self.local_heads = self.q_proj.output_size_per_partition // d
        self.local_kv_heads = self.k_proj.output_size_per_partition // d

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """x (B, T, h) replicated on the TP ranks -> (B, T, h), all-reduced over TP by o_proj."""
        B, T, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x)[0].view(B, T, self.local_heads, d).transpose(1, 2)  # (B, nh, T, d)
        k = self.k_proj(x)[0].view(B, T, self.local_kv_heads, d).transpose(1, 2)  # (B, nkv, T, d)
        v = self.v_proj(x)[0].view(B, T, self.local_kv_heads, d).transpose(1, 2)  # (B, nkv, T, d)
        if self.cfg.family == "llama":
            cos, sin = rotary_cos_sin(position_ids, d, self.cfg.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        group = self.local_heads // self.local_kv_heads
        if group > 1:  # each kv head serves `group` consecutive query heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if self.segment_mask:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=segment_causal_mask(segment_ids))
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.local_heads * d)  # (B, T, nh_local * d)
        return self.o_proj(y)[0]


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query t may attend key u: u <= t and same document.
    The diagonal is always allowed, so no row is empty (no NaN from softmax)."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (causal & same_segment)[:, None]
