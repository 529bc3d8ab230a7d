"""Causal self-attention with grouped-query heads, the heads split across tensor-parallel ranks."""
import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region
from torch import nn

from gridtrain.model.config import ModelConfig
from gridtrain.model.init import normal_init
from gridtrain.model.norms import RMSNorm
from gridtrain.model.rotary import apply_rotary, rotary_cos_sin


def tp_project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A megatron-core TP linear layer's output (communicating over TP as it does)."""
    return layer(x)[0]


def local_project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same product at TP = 1, without megatron-core's autograd wrapper around it (~30 us a
    call, a third of a decoding step's matmul time at hidden 512): inference only."""
    return F.linear(x, layer.weight, layer.bias)


class SelfAttention(nn.Module):
    """q, k, v are separate ColumnParallelLinears and o a RowParallelLinear, so TP rank r holds the
    contiguous heads [r*H/tp, (r+1)*H/tp) and kv heads [r*KV/tp, (r+1)*KV/tp): the full weights are
    the same at any TP, and each local query head's kv head is local too. gpt2 has biases and learned
    positions (added by the embedding); llama rotates q and k (RoPE), with the options of its family
    (ModelConfig): q/k/v and output biases (split with their columns / replicated), per-head q/k
    RMSNorms (replicated over TP) and a head size apart from hidden / heads."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, segment_mask: bool):
        super().__init__()
        self.cfg, self.segment_mask = cfg, segment_mask
        h, d = cfg.hidden_size, cfg.head_size
        init = normal_init(cfg.init_std)
        # GPT-2 / Megatron: residual-branch outputs scaled by 1/sqrt(2 * num_layers).
        out_init = normal_init(cfg.init_std / math.sqrt(2.0 * cfg.num_layers))
        column = dict(config=mp_config, init_method=init, bias=cfg.bias("qkv"), gather_output=False)
        self.q_proj = ColumnParallelLinear(h, cfg.num_attention_heads * d, **column)
        self.k_proj = ColumnParallelLinear(h, cfg.kv_heads * d, **column)
        self.v_proj = ColumnParallelLinear(h, cfg.kv_heads * d, **column)
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * d, h, config=mp_config, init_method=out_init, bias=cfg.bias("attn_out"),
            input_is_parallel=True, skip_bias_add=False,
        )
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        self.local_heads = self.q_proj.output_size_per_partition // d
        self.local_kv_heads = self.k_proj.output_size_per_partition // d

    def _qkv(self, x: torch.Tensor, position_ids: torch.Tensor, project=tp_project, rotary=rotary_cos_sin):
        """q (B, nh, T, d), k and v (B, nkv, T, d) of x (B, T, h); rotated for llama."""
        B, T, _ = x.shape
        d = self.cfg.head_size
        if project is local_project and hasattr(self, "fused_qkv"):  # one matmul (fuse_projections)
            weight, bias = self.fused_qkv
            q, k, v = F.linear(x, weight, bias).split([self.local_heads * d, self.local_kv_heads * d,
                                                        self.local_kv_heads * d], dim=-1)
        else:
            q, k, v = project(self.q_proj, x), project(self.k_proj, x), project(self.v_proj, x)
        q = q.reshape(B, T, self.local_heads, d)
        k = k.reshape(B, T, self.local_kv_heads, d)
        if self.cfg.qk_norm:
            q, k = self._head_norm(self.q_norm, q, project), self._head_norm(self.k_norm, k, project)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(B, T, self.local_kv_heads, d).transpose(1, 2)
        if self.cfg.family == "llama":
            cos, sin = rotary(position_ids, self.cfg)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def _head_norm(self, norm: RMSNorm, x: torch.Tensor, project) -> torch.Tensor:
        """RMSNorm of each head of x (B, T, local heads, d). Its weight is replicated over TP but
        each rank normalises only its own heads, so the weight's gradient is a sum over all TP
        ranks: copy_to_tensor_model_parallel_region all-reduces it in backward (identity forward)."""
        weight = norm.weight
        if project is not local_project:
            weight = copy_to_tensor_model_parallel_region(weight, group=self.q_proj.tp_group)
        return norm(x, weight)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, project=tp_project, **mask) -> torch.Tensor:
        """(B, T, h) out of q (B, nh, T, d) over k, v (B, nkv, S, d), all-reduced over TP by o_proj.
        Each kv head serves `group` consecutive query heads: training repeats k and v; inference
        (local_project, a growing cache) lets SDPA share them without copies (enable_gqa)."""
        B, _, T, d = q.shape
        group = self.local_heads // self.local_kv_heads
        if group > 1 and project is local_project:
            mask["enable_gqa"] = True
        elif group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, **mask)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, self.local_heads * d))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """x (B, T, h) replicated on the TP ranks -> (B, T, h), all-reduced over TP by o_proj."""
        q, k, v = self._qkv(x, position_ids)
        if self.segment_mask:
            return self._attend(q, k, v, attn_mask=segment_causal_mask(segment_ids))
        return self._attend(q, k, v, is_causal=True)

    def forward_cached(self, x: torch.Tensor, position_ids: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """Inference at TP = 1 with a KV cache (gridtrain.model.generation.KVCache): x (B, T, h)
        are the tokens after the cache.length already seen; their k, v are stored in the cache and
        each query attends to the valid keys before it (and always to itself)."""
        q, k, v = self._qkv(x, position_ids, local_project, cache.rotary)
        keys, values = cache.store(layer, k, v)  # (B, nkv, S, d), S = cache.length + T
        return self._attend(q, keys, values, local_project, **cache.attention_mask)


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query t may attend key u: u <= t and same document.
    The diagonal is always allowed, so no row is empty (no NaN from softmax)."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (causal & same_segment)[:, None]
