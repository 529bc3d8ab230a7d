"""`gridtrain train CONFIG --dry-run`: the resolved config and the numbers derived from it
(size, FLOPs, batch, accumulation, pipeline bubble, per-rank memory). Imports no torch/deepspeed."""
import yaml

from gridtrain.launcher.config import to_yaml
from gridtrain.model.flops import count_parameters, training_flops_per_token
from gridtrain.parallel.layout import Layout
from gridtrain.parallel.memory_estimate import stage_parameters_per_rank, zero_memory_per_rank
from gridtrain.train.run_config import RunConfig


def derived_numbers(cfg: RunConfig, layout: Layout) -> dict:
    """Numbers of a validated config on its layout. Memory is per rank, in bytes, for the largest
    pipeline stage (the one whose ranks run out of memory first)."""
    t = cfg.train
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_length)
    stage_params = stage_parameters_per_rank(cfg.model, tp, pp, layout.pipeline_partition)
    memory = zero_memory_per_rank(max(stage_params), dp, layout.zero_stage, t.dtype)
    return {
        "world_size": layout.world_size,
        "layout": f"TP={tp} x PP={pp} x DP={dp}",
        "parameters": count_parameters(cfg.model, None),  # as model cards count them: vocab unpadded
        "parameters_with_padded_vocab": count_parameters(cfg.model, tp),
        "padded_vocab_size": cfg.model.padded_vocab_size(tp),
        "parameters_per_rank_by_stage": stage_params,
        "training_flops_per_token": flops_per_token,
        "global_batch_samples": t.global_batch_size,
        "global_batch_tokens": tokens_per_step,
        "micro_batches_per_step": layout.grad_accum_steps,
        "pipeline_bubble_fraction": round(layout.pipeline_bubble, 6),
        "training_tokens": tokens_per_step * t.steps,
        "training_flops": flops_per_token * tokens_per_step * t.steps,
        "memory_per_rank_bytes": {"zero_stage": layout.zero_stage, "dtype": t.dtype, **memory},
        "memory_per_rank_gib": {k: round(v / 2**30, 3) for k, v in memory.items()},
    }


def report(cfg: RunConfig, layout: Layout, notes: list[str] = ()) -> str:
    """The resolved config (after comment lines naming each default chosen for this config), then
    the derived numbers, both as YAML (machine- and human-readable)."""
    derived = yaml.safe_dump({"derived": derived_numbers(cfg, layout)}, sort_keys=False,
                             default_flow_style=None, width=100)
    chosen = "".join(f"# {note}\n" for note in notes)
    return (f"# resolved config\n{chosen}{to_yaml(cfg)}\n"
            f"# derived (per-rank memory: weights, gradients, optimizer states)\n{derived}")
