"""Analytic parameter and FLOP counts of the decoder (no torch needed: used by --dry-run and MFU)."""
from gridtrain.model.config import ModelConfig


def layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one transformer block."""
    h, f, a = cfg.hidden_size, cfg.ffn_size, cfg.attention_width
    kv = cfg.kv_heads * cfg.head_size
    attention = h * a + 2 * h * kv + a * h  # q, k, v, out projections
    attention += (a + 2 * kv if cfg.bias("qkv") else 0) + (h if cfg.bias("attn_out") else 0)
    attention += 2 * cfg.head_size if cfg.qk_norm else 0  # per-head q and k norms
    if cfg.family == "gpt2":
        mlp = 2 * h * f + f + h
        norms = 2 * 2 * h  # two LayerNorms with weight and bias
    else:
        mlp = 3 * h * f + (2 * f + h if cfg.mlp_bias else 0)  # SwiGLU: gate, up, down
        norms = 2 * h  # two RMSNorms
    return attention + mlp + norms


def count_parameters(cfg: ModelConfig, tensor_parallel: int | None = 1) -> int:
    """All trainable parameters, with the vocab padded as for `tensor_parallel` ranks; None: the
    unpadded vocab (the count model cards publish)."""
    h = cfg.hidden_size
    vocab = cfg.vocab_size if tensor_parallel is None else cfg.padded_vocab_size(tensor_parallel)
    total = vocab * h + cfg.num_layers * layer_parameters(cfg)
    total += 2 * h if cfg.family == "gpt2" else h  # final norm
    if cfg.family == "gpt2":
        total += cfg.max_seq_len * h  # learned positions
    if not cfg.tied:
        total += vocab * h  # separate output head
    return total


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 per matmul weight (head included, embedding lookups
    excluded) plus 12*L*a*s for attention scores and values (a = heads x head size, the hidden size
    unless head_dim says otherwise), as Megatron and nanoGPT count."""
    matmul_weights = cfg.num_layers * layer_parameters(cfg) + cfg.vocab_size * cfg.hidden_size
    return 6.0 * matmul_weights + 12.0 * cfg.num_layers * cfg.attention_width * seq_len
