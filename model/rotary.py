"""Rotary position embeddings, Llama convention as in Hugging Face and Megatron ("rotate half":
dimension i pairs with i + head_dim/2), driven by position_ids so reset position ids just work.
The inverse frequencies follow transformers' rope initialisations (modeling_rope_utils): default,
linear and llama3 scaling."""
import math
from functools import lru_cache

import torch

from gridtrain.model.config import ModelConfig


@lru_cache(maxsize=16)
def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """(head_dim/2,) fp32 on the CPU: theta^(-2i/d), rescaled as cfg.rope_scaling says."""
    d = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        return _llama3(inv_freq, cfg)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths longer than original / low_freq_factor are divided by the
    factor, shorter than original / high_freq_factor kept, and those between blended smoothly."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original = cfg.rope_original_max_positions
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(position_ids: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) in fp32 for position_ids (B, T)."""
    inv_freq = inverse_frequencies(cfg).to(position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k of shape (B, heads, T, head_dim); computed in fp32, returned in x's dtype."""
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).type_as(x)
