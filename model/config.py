"""ModelConfig: the decoder's shape and family. Validation lives in gridtrain.launcher.validate."""
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

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
