"""The model section of a Hugging Face folder's config.json, read as JSON (no transformers, no
torch): llama (LlamaForCausalLM) and gpt2 (GPT2LMHeadModel) as gridtrain can represent them; every
option gridtrain does not implement is refused with one line naming it."""
import json
from pathlib import Path

from gridtrain.errors import UserError
from gridtrain.model.config import ModelConfig

GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation


def _refuse(folder: Path, field: str, value, fix: str) -> UserError:
    return UserError(f"{folder / 'config.json'}: {field}={value!r} is not supported ({fix})")


def _rope_theta(folder: Path, config: dict) -> float:
    """rope_theta from transformers 5's rope_parameters or 4's rope_theta; scaled rotary refused."""
    params = config.get("rope_parameters") or {}
    kind = params.get("rope_type", "default") if params else None
    scaling = config.get("rope_scaling")
    if kind not in (None, "default") or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise _refuse(folder, "rope_parameters" if params else "rope_scaling", params or scaling,
                      "gridtrain implements plain rotary embeddings, no rope scaling")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _llama(folder: Path, c: dict) -> ModelConfig:
    checks = (("hidden_act", c.get("hidden_act", "silu"), "silu", "SwiGLU uses silu"),
              ("attention_bias", c.get("attention_bias", False), False, "gridtrain's llama has no biases"),
              ("mlp_bias", c.get("mlp_bias", False), False, "gridtrain's llama has no biases"))
    for field, value, wanted, why in checks:
        if value != wanted:
            raise _refuse(folder, field, value, why)
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise _refuse(folder, "head_dim", c["head_dim"], f"gridtrain needs hidden_size / num_attention_heads = {c['hidden_size'] // heads}")
    return ModelConfig(family="llama", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                       num_layers=c["num_hidden_layers"], num_attention_heads=heads,
                       num_kv_heads=c.get("num_key_value_heads") or heads, ffn_hidden_size=c["intermediate_size"],
                       max_seq_len=c["max_position_embeddings"], norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                       rope_theta=_rope_theta(folder, c), tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def _gpt2(folder: Path, c: dict) -> ModelConfig:
    if c.get("activation_function", "gelu_new") not in GPT2_ACTIVATIONS:
        raise _refuse(folder, "activation_function", c["activation_function"], "gridtrain's gpt2 uses GELU (tanh)")
    if c.get("scale_attn_by_inverse_layer_idx"):
        raise _refuse(folder, "scale_attn_by_inverse_layer_idx", True, "gridtrain scales attention by 1/sqrt(head_dim) only")
    if not c.get("tie_word_embeddings", True):
        raise _refuse(folder, "tie_word_embeddings", False, "gridtrain's gpt2 ties its head to the embedding")
    return ModelConfig(family="gpt2", vocab_size=c["vocab_size"], hidden_size=c["n_embd"], num_layers=c["n_layer"],
                       num_attention_heads=c["n_head"], ffn_hidden_size=c.get("n_inner") or 4 * c["n_embd"],
                       max_seq_len=c["n_positions"], norm_eps=float(c.get("layer_norm_epsilon", 1e-5)))


def model_config_from_hf(folder: Path) -> ModelConfig:
    """The gridtrain model section of an HF folder; UserError for what gridtrain cannot represent."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: no readable config.json ({exc}); give a Hugging Face model folder") from None
    kind = config.get("model_type")
    if kind == "llama":
        return _llama(folder, config)
    if kind == "gpt2":
        return _gpt2(folder, config)
    raise _refuse(folder, "model_type", kind, "gridtrain converts llama (LlamaForCausalLM) and gpt2 (GPT2LMHeadModel)")
