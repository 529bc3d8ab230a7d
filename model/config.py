"""ModelConfig: the decoder's shape and family. Validation lives in gridtrain.launcher.validate.

One decoder with options, not copies: gpt2 (learned positions, LayerNorm, GELU, biases, tied head)
and llama (RoPE, RMSNorm, SwiGLU); the llama family covers Llama 2/3.x, Mistral, Qwen 2/2.5/3 and
SmolLM2 through head_dim, rope scaling, q/k/v and MLP biases and per-head q/k norms."""
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["gpt2", "llama"] = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 8
    # None: same as num_attention_heads (multi-head attention). Llama uses fewer (grouped-query).
    num_kv_heads: Optional[int] = None
    # None: 4*hidden for gpt2; for llama 8/3*hidden rounded up to a multiple of 256 (Llama's rule).
    ffn_hidden_size: Optional[int] = None
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None: tied for gpt2, untied for llama.
    tie_embeddings: Optional[bool] = None
    init_std: float = 0.02
    # Megatron pads the vocab to a multiple of this times TP; the padding never reaches logits/loss.
    make_vocab_size_divisible_by: int = 128
    activation_checkpointing: bool = False
    # Size of each attention head; None: hidden_size / num_attention_heads. Qwen 3 sets it apart
    # (0.6B: hidden 1024, 16 heads of 128), so q and k are heads x head_dim wide, not hidden.
    head_dim: Optional[int] = None
    # Rotary scaling (llama family): "linear" divides positions by rope_factor; "llama3" (Llama 3.1
    # and later) rescales the low frequencies by rope_factor, the high ones not at all and blends
    # between, with the wavelength bounds rope_original_max_positions / rope_low_freq_factor and
    # / rope_high_freq_factor.
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: Optional[int] = None
    # Biases of the llama family (gpt2 has all of them): on q, k and v (Qwen 2/2.5), on the attention
    # output projection (with q/k/v: Llama's attention_bias), on the MLP (Llama's mlp_bias).
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    # RMSNorm (norm_eps) over each head's q and k before the rotation (Qwen 3).
    qk_norm: bool = False
    # The Hugging Face model_type `convert --to hf` writes; None: qwen3 with qk_norm, qwen2 with q/k/v
    # biases only, else llama. `convert --to gridtrain` records the source's (e.g. mistral).
    hf_model_type: Optional[Literal["llama", "mistral", "qwen2", "qwen3"]] = None

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """head_dim, or hidden_size / num_attention_heads when it is not set."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def attention_width(self) -> int:
        """Width of q (and of the attention output): heads x head size."""
        return self.num_attention_heads * self.head_size

    def bias(self, which: str) -> bool:
        """Whether the "qkv", "attn_out" or "mlp" projections have biases."""
        return self.family == "gpt2" or getattr(self, f"{which}_bias")

    @property
    def export_model_type(self) -> str:
        """The Hugging Face model_type of this model (llama family: see hf_model_type)."""
        if self.family == "gpt2":
            return "gpt2"
        if self.hf_model_type:
            return self.hf_model_type
        if self.qk_norm:
            return "qwen3"
        return "qwen2" if self.qkv_bias and not self.attn_out_bias else "llama"

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.family == "gpt2":
            return 4 * self.hidden_size
        return 256 * -(-(8 * self.hidden_size // 3) // 256)

    @property
    def tied(self) -> bool:
        return self.family == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Megatron's rule: the vocab rounded up to a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return multiple * -(-self.vocab_size // multiple)
