"""The one place model/ builds megatron-core's ModelParallelConfig, which every TP layer reads."""
import torch
from megatron.core import ModelParallelConfig


def build_parallel_config(tp_size: int) -> ModelParallelConfig:
    """TP layers as they work on CPU and GPU alike.

    use_cpu_initialization=True: each rank draws the FULL weight on the host from the (seeded) global
    RNG and keeps its slice, so the full weights are the same at any TP. sequence_parallel=False:
    megatron-core's sequence-parallel path needs CUDA. Master weights stay fp32; bf16/fp16 compute
    comes from DeepSpeed's config, not from here.
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        sequence_parallel=False,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )
