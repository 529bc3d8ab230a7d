"""gridtrain layers <-> Hugging Face tensors, one layer at a time, both directions.

gridtrain keys are the layer keys of gridtrain.model.naming (full, unpadded tensors). Llama maps
name for name (HF's rotary is the same "rotate half", so Q/K rows need no permutation; K/V hold
num_key_value_heads heads in the same order). GPT-2's HF model uses Conv1D, whose weight is the
transpose of a Linear's, and one fused c_attn for Q, K and V (concatenated in that order along
the output dimension). A tied head has no tensor of its own in either format.
"""
from typing import Callable

import torch

from gridtrain.model.config import ModelConfig
from gridtrain.model.naming import EMBEDDING, final_norm_index, head_index

Tensors = dict[str, torch.Tensor]

LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
# The llama family's options (ModelConfig), each adding tensors named alike in both formats.
LLAMA_OPTIONAL = {
    "qkv_bias": {f"attn.{p}_proj.bias": f"self_attn.{p}_proj.bias" for p in "qkv"},
    "attn_out_bias": {"attn.o_proj.bias": "self_attn.o_proj.bias"},
    "qk_norm": {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"},
    "mlp_bias": {f"mlp.{p}_proj.bias": f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")},
}


def llama_block(cfg: ModelConfig) -> dict[str, str]:
    """gridtrain key -> HF name (within a layer) of a llama-family block with cfg's options."""
    block = dict(LLAMA_BLOCK)
    for option, names in LLAMA_OPTIONAL.items():
        if getattr(cfg, option):
            block.update(names)
    return block


# gpt2 block tensors that map one to one (Conv1D weights are transposed on the way).
GPT2_BLOCK = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn.o_proj.weight": "attn.c_proj.weight", "attn.o_proj.bias": "attn.c_proj.bias",
    "mlp_norm.weight": "ln_2.weight", "mlp_norm.bias": "ln_2.bias",
    "mlp.fc_in.weight": "mlp.c_fc.weight", "mlp.fc_in.bias": "mlp.c_fc.bias",
    "mlp.fc_out.weight": "mlp.c_proj.weight", "mlp.fc_out.bias": "mlp.c_proj.bias",
}
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def _simple(cfg: ModelConfig, layer: int) -> dict[str, str]:
    """gridtrain key -> HF name for the tensors of `layer` that map one to one."""
    llama = cfg.family == "llama"
    if layer == EMBEDDING:
        return {"word.weight": "model.embed_tokens.weight"} if llama else {
            "word.weight": "transformer.wte.weight", "position.weight": "transformer.wpe.weight"}
    if layer == final_norm_index(cfg.num_layers):
        return {"norm.weight": "model.norm.weight"} if llama else {
            "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias"}
    if layer == head_index(cfg.num_layers):
        return {} if cfg.tied else {"proj.weight": "lm_head.weight"}
    prefix = f"model.layers.{layer - 1}." if llama else f"transformer.h.{layer - 1}."
    return {key: prefix + name for key, name in (llama_block(cfg) if llama else GPT2_BLOCK).items()}


def _conv1d(cfg: ModelConfig, key: str) -> bool:
    return cfg.family == "gpt2" and key.endswith(".weight") and key.startswith(("attn.o_proj", "mlp.fc"))


def _is_block(cfg: ModelConfig, layer: int) -> bool:
    return EMBEDDING < layer < final_norm_index(cfg.num_layers)


def to_hf(cfg: ModelConfig, layer: int, tensors: Tensors) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of gridtrain layer `layer`, in a fixed order (`tensors` by gridtrain key)."""
    out = [(name, tensors[key].t() if _conv1d(cfg, key) else tensors[key])
           for key, name in _simple(cfg, layer).items()]
    if cfg.family == "gpt2" and _is_block(cfg, layer):
        prefix = f"transformer.h.{layer - 1}.attn.c_attn."
        out.append((prefix + "weight", torch.cat([tensors[f"{p}.weight"] for p in QKV], dim=0).t()))
        out.append((prefix + "bias", torch.cat([tensors[f"{p}.bias"] for p in QKV], dim=0)))
    return out


def from_hf(cfg: ModelConfig, layer: int, get: Callable[[str], torch.Tensor]) -> Tensors:
    """gridtrain layer `layer` (by key) from HF tensors, `get(hf_name)` giving each."""
    out = {}
    for key, name in _simple(cfg, layer).items():
        out[key] = get(name).t() if _conv1d(cfg, key) else get(name)
    if cfg.family == "gpt2" and _is_block(cfg, layer):
        prefix = f"transformer.h.{layer - 1}.attn.c_attn."
        h = cfg.hidden_size
        weight, bias = get(prefix + "weight").t(), get(prefix + "bias")  # (3h, h), (3h,)
        for i, part in enumerate(QKV):
            out[f"{part}.weight"] = weight[i * h:(i + 1) * h]
            out[f"{part}.bias"] = bias[i * h:(i + 1) * h]
    return {key: tensor.contiguous() for key, tensor in out.items()}


def hf_names(cfg: ModelConfig, layer: int) -> list[str]:
    """The HF tensor names `from_hf` reads for `layer`."""
    names = list(_simple(cfg, layer).values())
    if cfg.family == "gpt2" and _is_block(cfg, layer):
        names += [f"transformer.h.{layer - 1}.attn.c_attn.{p}" for p in ("weight", "bias")]
    return names
