"""The model section of a Hugging Face folder's config.json, read as JSON (no transformers, no
torch), for the model types gridtrain represents: llama (Llama 2/3.x, SmolLM2), mistral, qwen2
(Qwen 2/2.5), qwen3 and gpt2. Every option gridtrain does not implement is refused with one line
naming it: rotary scaling other than linear and llama3 (yarn, dynamic, longrope), a sliding window
(gridtrain trains full attention), partial rotary, activations other than the family's."""
import json
from pathlib import Path

from gridtrain.errors import UserError
from gridtrain.model.config import ModelConfig

GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _Fields(dict):
    """config.json's fields; a missing required one is a UserError naming it, not a KeyError."""

    def __init__(self, folder: Path, data: dict):
        super().__init__(data)
        self.folder = folder

    def __missing__(self, key):
        raise UserError(f"{self.folder / 'config.json'}: no {key!r} field (model_type {self.get('model_type')!r} "
                        "needs it); give the model's complete config.json")

    def refuse(self, field: str, value, fix: str) -> UserError:
        return UserError(f"{self.folder / 'config.json'}: {field}={value!r} is not supported ({fix})")


def _rope(c: _Fields) -> dict:
    """The rotary fields of ModelConfig from transformers 5's rope_parameters or the rope_scaling
    (and rope_theta) of older files; the field the file has is the one a refusal names."""
    params, scaling = c.get("rope_parameters"), c.get("rope_scaling")
    field, spec = ("rope_parameters", params) if params else ("rope_scaling", scaling or {})
    kind = spec.get("rope_type", spec.get("type", "default"))
    theta = float(spec.get("rope_theta", c.get("rope_theta", 10000.0)))
    if spec.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise c.refuse("partial_rotary_factor", spec.get("partial_rotary_factor", c.get("partial_rotary_factor")),
                       "gridtrain rotates the whole head")
    if kind == "default":
        return {"rope_theta": theta}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": "linear", "rope_factor": float(spec["factor"])}
    if kind == "llama3":
        return {"rope_theta": theta, "rope_scaling": "llama3", "rope_factor": float(spec["factor"]),
                "rope_low_freq_factor": float(spec["low_freq_factor"]),
                "rope_high_freq_factor": float(spec["high_freq_factor"]),
                "rope_original_max_positions": int(spec["original_max_position_embeddings"])}
    raise c.refuse(f"{field}.rope_type", kind, "gridtrain implements rotary scaling of type linear and llama3; "
                   "yarn, dynamic and longrope are not")


def _sliding_window(c: _Fields, kind: str) -> None:
    """A window shorter than the context changes what each token attends to: refused. (A window
    as long as the context, or one Qwen's use_sliding_window turns off, changes nothing.)"""
    if kind in ("qwen2", "qwen3"):
        if c.get("use_sliding_window"):
            raise c.refuse("use_sliding_window", True, "gridtrain trains full attention; set it to false")
        return
    window = c.get("sliding_window")
    if window is not None and window < c["max_position_embeddings"]:
        raise c.refuse("sliding_window", window, "gridtrain trains full attention (a window shorter than "
                       f"max_position_embeddings {c['max_position_embeddings']}); set it to null")


def _biases(c: _Fields, kind: str) -> dict:
    """Which projections carry biases, as each transformers model class builds them: Qwen 2 always
    on q, k and v (never on o); Llama and Qwen 3 on all four with attention_bias; Mistral none."""
    if kind == "qwen2":
        return {"qkv_bias": True, "attn_out_bias": False, "mlp_bias": False}
    if kind == "mistral":
        return {"qkv_bias": False, "attn_out_bias": False, "mlp_bias": False}
    attention = bool(c.get("attention_bias", False))
    mlp = bool(c.get("mlp_bias", False)) if kind == "llama" else False
    return {"qkv_bias": attention, "attn_out_bias": attention, "mlp_bias": mlp}


def _llama_family(c: _Fields, kind: str) -> ModelConfig:
    if c.get("hidden_act", "silu") != "silu":
        raise c.refuse("hidden_act", c["hidden_act"], "the llama family's SwiGLU uses silu")
    _sliding_window(c, kind)
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    head_dim = c.get("head_dim")
    return ModelConfig(
        family="llama", vocab_size=c["vocab_size"], hidden_size=hidden, num_layers=c["num_hidden_layers"],
        num_attention_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
        ffn_hidden_size=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        head_dim=head_dim if head_dim not in (None, hidden // heads) else None, qk_norm=kind == "qwen3",
        hf_model_type=kind, **_rope(c), **_biases(c, kind))


def _gpt2(c: _Fields) -> ModelConfig:
    if c.get("activation_function", "gelu_new") not in GPT2_ACTIVATIONS:
        raise c.refuse("activation_function", c["activation_function"], "gridtrain's gpt2 uses GELU (tanh)")
    if c.get("scale_attn_by_inverse_layer_idx"):
        raise c.refuse("scale_attn_by_inverse_layer_idx", True, "gridtrain scales attention by 1/sqrt(head_dim) only")
    if not c.get("tie_word_embeddings", True):
        raise c.refuse("tie_word_embeddings", False, "gridtrain's gpt2 ties its head to the embedding")
    return ModelConfig(family="gpt2", vocab_size=c["vocab_size"], hidden_size=c["n_embd"], num_layers=c["n_layer"],
                       num_attention_heads=c["n_head"], ffn_hidden_size=c.get("n_inner") or 4 * c["n_embd"],
                       max_seq_len=c["n_positions"], norm_eps=float(c.get("layer_norm_epsilon", 1e-5)))


def model_config_from_hf(folder: Path) -> ModelConfig:
    """The gridtrain model section of an HF folder; UserError for what gridtrain cannot represent."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{folder}: no readable config.json ({exc}); give a Hugging Face model folder") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder / 'config.json'}: holds a JSON {type(config).__name__}, not an object of model "
                        "fields; give a Hugging Face model folder")
    c = _Fields(folder, config)
    kind = c.get("model_type")
    if kind in LLAMA_TYPES:
        return _llama_family(c, kind)
    if kind == "gpt2":
        return _gpt2(c)
    raise c.refuse("model_type", kind, "gridtrain converts llama (Llama 2/3.x, SmolLM2), mistral, qwen2 (Qwen "
                   "2/2.5), qwen3 and gpt2")
