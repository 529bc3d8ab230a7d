"""ParallelConfig (the TP x PP x DP layout and the ZeRO stage) and OptimConfig (the optimizer and
its schedule, built by gridtrain.parallel.optim): the sections the parallel layer owns. No torch,
so composing and validating a config stays fast."""
from dataclasses import dataclass
from typing import Literal, Optional, Union


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # "auto" (or null): world_size / (tensor_parallel * pipeline_parallel), so the same config runs
    # on whatever number of nodes a job gets; a number pins the world to TP x PP x DP.
    data_parallel: Union[int, Literal["auto"], None] = "auto"
    # None: 1 for train.dtype bf16 without a pipeline (DeepSpeed's ZeRO-0 bf16 optimizer drifts; ZeRO-1
    # holds the same memory at DP=1), else 0. Chosen when the config is composed.
    zero_stage: Optional[int] = None
    sequence_parallel: bool = False
    # How DeepSpeed's PipelineModule splits layers: "parameters" balances weights, "uniform" counts layers.
    pipeline_partition: Literal["parameters", "uniform"] = "parameters"
    # "auto": nccl with CUDA, gloo without.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # "cpu": megatron-core builds full weights on the host and slices them (layout-independent).
    # "cuda" (megatron-core's RNG tracker initialising shards on the device) is not implemented yet:
    # validation refuses it.
    init_device: Literal["cpu", "cuda"] = "cpu"
    # Bound on every collective: a dead peer turns into an error instead of a hang.
    timeout_minutes: float = 10.0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # None: decay over train.steps.
    decay_steps: Optional[int] = None
