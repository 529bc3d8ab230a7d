"""Per-rank memory of weights, gradients and optimizer states, from the ZeRO paper's formulas
(Rajbhandari et al. 2020, section 3.1 and figure 1), with the weights first sharded by TP and PP.
Imports no torch: `gridtrain train --dry-run` and the engine benchmark both use it."""
from gridtrain.model.config import ModelConfig

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}


def zero_memory_per_rank(num_params: int, dp: int, zero_stage: int, dtype: str) -> dict[str, int]:
    """Bytes one data-parallel rank holds for `num_params` parameters (the parameters of its own
    TP x PP shard), partitioned over `dp` ranks as ZeRO stage `zero_stage` does.

    Mixed precision (bf16/fp16), the paper's case: weights 2*P, gradients 2*P, optimizer K*P with
    K = 12: fp32 master weights 4*P + Adam momentum 4*P + Adam variance 4*P.
    fp32: weights 4*P and gradients 4*P. Stage 0 runs a plain torch AdamW whose master weights are
    the model weights themselves, so the optimizer holds only the moments (8*P). Stages 1-3 run
    DeepSpeed's ZeRO optimizer, which keeps its own flat fp32 copy of its weight partition even in
    fp32, so K = 12 again.
    Stage 1 divides the optimizer states by dp, stage 2 also the gradients, stage 3 also the weights.
    """
    if dtype not in BYTES_PER_PARAM:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(BYTES_PER_PARAM)}")
    if zero_stage not in (0, 1, 2, 3) or dp < 1:
        raise ValueError(f"zero_stage {zero_stage} / dp {dp}: expected stage 0-3 and dp >= 1")
    width = BYTES_PER_PARAM[dtype]
    has_master = dtype != "fp32" or zero_stage >= 1
    master = 4 * num_params if has_master else 0
    moments = 8 * num_params
    weights = width * num_params
    gradients = width * num_params

    def shard(nbytes: int, from_stage: int) -> int:
        return -(-nbytes // dp) if zero_stage >= from_stage else nbytes

    out = {
        "weights": shard(weights, 3),
        "gradients": shard(gradients, 2),
        "master_weights": shard(master, 1),
        "adam_moments": shard(moments, 1),
    }
    out["optimizer"] = out["master_weights"] + out["adam_moments"]
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"]
    return out


def layer_parameters_per_tp_rank(cfg: ModelConfig, tensor_parallel: int) -> list[int]:
    """Parameters one TP rank holds for each entry of the pipeline layer list, in the order of
    gridtrain.model.decoder.build_layer_factories: embedding, blocks, final norm, head.
    Split across TP: vocab rows, q/k/v/fc1 output columns (and their biases), out/fc2 input rows.
    Replicated: norms (per-head q/k norms too), learned positions, the biases of row-parallel layers."""
    tp, h, f, a = tensor_parallel, cfg.hidden_size, cfg.ffn_size, cfg.attention_width
    kv = cfg.kv_heads * cfg.head_size
    vocab_rows = cfg.padded_vocab_size(tp) // tp
    embedding = vocab_rows * h + (cfg.max_seq_len * h if cfg.family == "gpt2" else 0)
    attention = (2 * h * a + 2 * h * kv) // tp
    attention += ((a + 2 * kv) // tp if cfg.bias("qkv") else 0) + (h if cfg.bias("attn_out") else 0)
    attention += 2 * cfg.head_size if cfg.qk_norm else 0
    if cfg.family == "gpt2":
        block = attention + (2 * h * f + f) // tp + h + 4 * h
        final_norm = 2 * h
    else:
        block = attention + (3 * h * f + (2 * f if cfg.mlp_bias else 0)) // tp + (h if cfg.mlp_bias else 0) + 2 * h
        final_norm = h
    # A tied head is DeepSpeed's TiedLayerSpec: the last stage builds its own copy of the embedding.
    head = embedding if cfg.tied else vocab_rows * h
    return [embedding] + [block] * cfg.num_layers + [final_norm, head]


def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """Stage boundaries as DeepSpeed's partition_balanced picks them (deepspeed/runtime/utils.py:
    dynamic programming minimising max-minus-min stage weight); parts[i]:parts[i+1] is stage i."""
    n, m = len(weights), num_parts
    if n <= m:
        return [min(p, n) for p in range(m + 1)]
    inf = float("inf")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    dp_max[0][0] = cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                hi, lo = max(dp_max[k][j - 1], part), min(dp_min[k][j - 1], part)
                if cost[i][j] >= hi - lo:
                    cost[i][j], dp_max[i][j], dp_min[i][j], position[i][j] = hi - lo, hi, lo, k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    return parts[::-1]


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's partition_uniform: equal layer counts, the first stages take the remainder."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


def stage_parameters_per_rank(cfg: ModelConfig, tensor_parallel: int, pipeline_parallel: int,
                              method: str = "parameters") -> list[int]:
    """Parameters held by one TP rank of each pipeline stage (the DP replicas hold the same)."""
    layers = layer_parameters_per_tp_rank(cfg, tensor_parallel)
    if pipeline_parallel == 1:
        # One module: a tied head is the embedding itself, not a second copy.
        return [sum(layers) - (layers[-1] if cfg.tied else 0)]
    if method == "uniform":
        parts = partition_uniform(len(layers), pipeline_parallel)
    else:
        parts = partition_balanced(layers, pipeline_parallel)
    return [sum(layers[parts[s]:parts[s + 1]]) for s in range(pipeline_parallel)]
