"""Rotary position embeddings, Llama convention as in Hugging Face and Megatron ("rotate half":
dimension i pairs with i + head_dim/2), driven by position_ids so reset position ids just work."""
import torch


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) in fp32 for position_ids (B, T)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (head_dim/2,)
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
