"""Autoregressive generation with a KV cache: greedy at temperature 0, else sampling with
temperature, top-k and top-p; a batch of prompts is left-padded and each stops at eos."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from gridtrain.model.block import Block
from gridtrain.model.rotary import rotary_cos_sin


class KVCache:
    """Keys and values of every block for a batch, preallocated for `capacity` positions.
    `valid` (B, capacity) marks real tokens (left padding is not), so no query attends to it."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self.attention_mask: dict = {}  # SDPA's mask arguments for the current step (begin())
        self._rotary = None  # the current step's cos, sin: the same for every layer

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, d) after the cached positions; returns all keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def begin(self, new: int) -> None:
        """Set the mask of a step adding `new` tokens, once for every layer: none when every
        position is valid (decoding one token attends to all; a first step is causal), else
        explicit."""
        self._rotary = None
        if bool(self.valid[:, :self.length + new].all()):
            self.attention_mask = {"is_causal": True} if self.length == 0 and new > 1 else {}
        else:
            self.attention_mask = {"attn_mask": self.mask(new)}

    def rotary(self, position_ids: torch.Tensor, cfg):
        """rotary_cos_sin of this step's positions, computed by the first layer that asks."""
        if self._rotary is None:
            self._rotary = rotary_cos_sin(position_ids, cfg)
        return self._rotary

    def mask(self, new: int) -> torch.Tensor:
        """(B, 1, new, length + new) bool: a new query attends to earlier valid keys and itself."""
        end = self.length + new
        query_pos = torch.arange(self.length, end, device=self.valid.device)[:, None]
        key_pos = torch.arange(end, device=self.valid.device)[None, :]
        causal = key_pos <= query_pos
        return ((causal & self.valid[:, None, :end]) | (key_pos == query_pos))[:, None]

    def advance(self, count: int) -> None:
        self.length += count


def fuse_projections(decoder) -> None:
    """For inference at TP = 1: each block's q, k, v weights (and llama's gate and up) become views
    of one concatenated weight, which attention (and the MLP) then multiply in one matmul instead of
    three (two). Same values, no extra memory; the decoder is not trained afterwards."""
    def fuse(layers):
        weight = torch.cat([layer.weight.detach() for layer in layers])
        bias = torch.cat([layer.bias.detach() for layer in layers]) if layers[0].bias is not None else None
        start = 0
        for layer in layers:
            rows = layer.weight.shape[0]
            layer.weight.data = weight[start:start + rows]
            if bias is not None:
                layer.bias.data = bias[start:start + rows]
            start += rows
        return weight, bias

    for block in (m for m in decoder.modules() if isinstance(m, Block)):
        attn = block.attn
        attn.fused_qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        if block.mlp.family == "llama":
            block.mlp.fused_gate_up = fuse([block.mlp.gate_proj, block.mlp.up_proj])


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - ordered.softmax(dim=-1) >= sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(decoder, prompts: list[list[int]], sampling: Sampling, stop_ids, pad_id: int = 0,
             on_tokens: Optional[Callable[[list[list[int]]], None]] = None,
             vocab_size: Optional[int] = None) -> list[list[int]]:
    """New token ids for each prompt, each stopping after the first id in `stop_ids` (eos, an
    end-of-turn token; included); `on_tokens(new)` is called after every step with all new tokens
    so far (for streaming). Only ids below `vocab_size` (None: the model's) are chosen: a model
    vocab larger than its tokenizer's has rows that are no token."""
    cfg, device = decoder.cfg, next(decoder.parameters()).device
    vocab = min(cfg.vocab_size, vocab_size or cfg.vocab_size)
    longest = max(len(p) for p in prompts)
    capacity = longest + sampling.max_new_tokens
    if capacity > cfg.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceed the "
                         f"model's max_seq_len ({cfg.max_seq_len})")
    batch = len(prompts)
    tokens = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    cache = KVCache(cfg.num_layers, batch, cfg.kv_heads, cfg.head_size, capacity,
                    next(decoder.parameters()).dtype, device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        cache.valid[row, longest - len(prompt):longest] = True
    positions = (cache.valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    new = [[] for _ in prompts]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stops = torch.tensor(sorted({stop_ids} if isinstance(stop_ids, int) else set(stop_ids)), dtype=torch.long,
                         device=device)
    logits = decoder.forward_cached(tokens, positions, cache)[:, -1, :vocab]
    for step in range(sampling.max_new_tokens):
        chosen = pick(logits, sampling, generator)
        for row in (~finished).nonzero().flatten().tolist():
            new[row].append(int(chosen[row]))
        finished |= torch.isin(chosen, stops)
        if on_tokens is not None:
            on_tokens(new)
        if bool(finished.all()) or step + 1 == sampling.max_new_tokens:
            break
        cache.valid[:, cache.length] = True
        positions = positions[:, -1:] + 1
        logits = decoder.forward_cached(chosen[:, None], positions, cache)[:, -1, :vocab]
    return new
