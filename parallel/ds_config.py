"""DeepSpeed's config dict, from the run's Layout, its optimizer section and its precision."""
from gridtrain.parallel.config import OptimConfig
from gridtrain.parallel.layout import Layout


def deepspeed_clips(zero_stage: int, dtype: str) -> bool:
    """Whether DeepSpeed's own gradient clipping is right for this run. Its fp32 ZeRO-0 path
    (clip_fp32_gradients) miscounts the norm under PP (see gridtrain.parallel.grad_clip) and never
    records it, so there gridtrain.parallel.grad_clip clips instead; ZeRO 1-3 and the
    bf16/fp16 optimizers compute the global norm correctly and report it."""
    return zero_stage > 0 or dtype != "fp32"


def build_ds_config(layout: Layout, optim: OptimConfig, dtype: str) -> dict:
    """The dict passed to deepspeed.initialize(config=...). The layout's rules (ZeRO with
    pipelines, whole micro-batches per DP rank) were checked when it was built."""
    stage = layout.zero_stage
    zero = {"stage": stage}
    if stage == 3:
        # Partition every parameter, however small: memory then follows the ZeRO-3 formula, and
        # every parameter is saved in the ZeRO-3 partitions the checkpoint reader merges.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        "gradient_clipping": optim.grad_clip if deepspeed_clips(stage, dtype) else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        # loss_scale 0: dynamic loss scaling, the usual fp16 recipe
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": None,  # gridtrain.train.metrics logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
