"""An independent plain-torch decoder (nanoGPT-style gpt2, Meta/HF-style Llama) that reads the FULL
weights of a gridtrain Decoder state dict. Written without any gridtrain or megatron code, with
explicit attention, so the tests compare two implementations, not one with itself."""
import math

import torch
import torch.nn.functional as F


def _embedding_prefix(cfg) -> str:
    return "tied_modules.embed." if cfg.tied else "0."


def _layer_norm(cfg, w, prefix, x):
    if cfg.family == "gpt2":
        return F.layer_norm(x, (x.shape[-1],), w[prefix + "weight"], w[prefix + "bias"], cfg.norm_eps)
    return _rms(cfg, w[prefix + "weight"], x)


def _rms(cfg, weight, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight


def _linear(w, prefix, x):
    return F.linear(x, w[prefix + "weight"], w.get(prefix + "bias"))


def rope(x, position_ids, theta, interleaved=False):
    """x (B, H, T, d). interleaved=False pairs dims (i, i + d/2) (HF/Megatron "rotate half");
    interleaved=True pairs (2i, 2i+1) (Meta's original): the wrong convention for gridtrain."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    angle = position_ids.double()[:, None, :, None] * freqs  # (B, 1, T, d/2)
    rotation = torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        pairs = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * rotation
        return torch.stack((pairs.real, pairs.imag), dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * rotation
    return torch.cat((pairs.real, pairs.imag), dim=-1).to(x.dtype)


def _attention(cfg, w, p, x, position_ids, segment_ids, segment_mask, interleaved):
    B, T, _ = x.shape
    H, KV, d = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    q = _linear(w, p + "q_proj.", x).view(B, T, H, d)
    k = _linear(w, p + "k_proj.", x).view(B, T, KV, d)
    if cfg.qk_norm:  # Qwen 3: RMSNorm over each head before the rotation
        q, k = _rms(cfg, w[p + "q_norm.weight"], q), _rms(cfg, w[p + "k_norm.weight"], k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = _linear(w, p + "v_proj.", x).view(B, T, KV, d).transpose(1, 2)
    if cfg.family == "llama":
        q, k = rope(q, position_ids, cfg.rope_theta, interleaved), rope(k, position_ids, cfg.rope_theta, interleaved)
    kv_of_head = torch.arange(H) // (H // KV)  # grouped-query: query head j reads kv head j // group
    k, v = k[:, kv_of_head], v[:, kv_of_head]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, T, T)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None]
    if segment_mask:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    y = scores.softmax(-1) @ v  # (B, H, T, d)
    return _linear(w, p + "o_proj.", y.transpose(1, 2).reshape(B, T, H * d))


def _mlp(cfg, w, p, x):
    if cfg.family == "gpt2":
        return _linear(w, p + "fc_out.", F.gelu(_linear(w, p + "fc_in.", x), approximate="tanh"))
    return _linear(w, p + "down_proj.", F.silu(_linear(w, p + "gate_proj.", x)) * _linear(w, p + "up_proj.", x))


def reference_logits(cfg, w, tokens, position_ids, segment_ids, segment_mask=False, interleaved_rope=False):
    """Logits (B, T, vocab_size), unpadded, from full weights `w` (name -> tensor)."""
    emb = w[_embedding_prefix(cfg) + "word.weight"][: cfg.vocab_size]
    x = emb[tokens]
    if cfg.family == "gpt2":
        x = x + w[_embedding_prefix(cfg) + "position.weight"][position_ids]
    for layer in range(cfg.num_layers):
        p = f"{layer + 1}."
        x = x + _attention(cfg, w, p + "attn.", _layer_norm(cfg, w, p + "attn_norm.", x),
                           position_ids, segment_ids, segment_mask, interleaved_rope)
        x = x + _mlp(cfg, w, p + "mlp.", _layer_norm(cfg, w, p + "mlp_norm.", x))
    x = _layer_norm(cfg, w, f"{cfg.num_layers + 1}.norm.", x)
    head = emb if cfg.tied else w[f"{cfg.num_layers + 2}.proj.weight"][: cfg.vocab_size]
    return x @ head.T
