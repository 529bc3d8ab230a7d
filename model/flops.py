"""Analytic parameter and FLOP counts of the decoder (no torch needed: used by --dry-run and MFU)."""
from gridtrain.model.config import ModelConfig


def layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one transformer block."""
    h, f = cfg.hidden_size, cfg.ffn_size
    kv = cfg.kv_heads * cfg.head_dim
    attention = h * h + 2 * h * kv + h * h  # q, k, v, out projections
    if cfg.family == "gpt2":
        attention += h + 2 * kv + h  # qkv and out biases
        mlp = 2 * h * f + f + h
        norms = 2 * 2 * h  # two LayerNorms with weight and bias
    else:
        mlp = 3 * h * f  # SwiGLU: gate, up, down
        norms = 2 * h  # two RMSNorms
    return attention + mlp + norms


def count_parameters(cfg: ModelConfig, tensor_parallel: int = 1) -> int:
    """All trainable parameters, with the vocab padded as for `tensor_parallel` ranks."""
    h, vocab = cfg.hidden_size, cfg.padded_vocab_size(tensor_parallel)
    total = vocab * h + cfg.num_layers * layer_parameters(cfg)
    total += 2 * h if cfg.family == "gpt2" else h  # final norm
    if cfg.family == "gpt2":
        total += cfg.max_seq_len * h  # learned positions
    if not cfg.tied:
        total += vocab * h  # separate output head
    return total


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 per matmul weight (head included, embedding lookups
    excluded) plus 12*L*h*s for attention scores and values, as Megatron and nanoGPT count."""
    matmul_weights = cfg.num_layers * layer_parameters(cfg) + cfg.vocab_size * cfg.hidden_size
    return 6.0 * matmul_weights + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len
