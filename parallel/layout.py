"""Layout: how one run is split over its ranks (torchtitan's ParallelDims is the model).

Built once, by `build_layout` (which gridtrain.launcher.validate calls with the real world size),
and passed explicitly to the process groups, the DeepSpeed config, the data loader, checkpoints
and the dry-run. Every rule about the split lives here: the DP degree
`parallel.data_parallel: auto` stands for, the world size TP x PP x DP, ZeRO with pipelines, and the
global batch as whole micro-batches per DP rank. Imports no torch.
"""
from dataclasses import dataclass

from gridtrain.errors import ConfigError
from gridtrain.parallel.config import ParallelConfig

Problem = tuple[str, object, str]


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    global_batch_size: int
    # How layers are split over pipeline stages: "parameters" balances weights, "uniform" counts layers.
    pipeline_partition: str = "parameters"

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches each rank runs per optimizer step (gradient accumulation; with PP > 1,
        the micro-batches of one pipeline schedule): global batch / (micro batch x DP)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def pipeline_bubble(self) -> float:
        """Idle fraction of a 1F1B schedule: (p - 1) / (m + p - 1)."""
        return (self.pp - 1) / (self.grad_accum_steps + self.pp - 1)

    def describe(self) -> str:
        return f"TP {self.tp} x PP {self.pp} x DP {self.dp}, ZeRO {self.zero_stage}"

    def record(self) -> dict:
        """The split as a checkpoint's manifest records it."""
        return {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "dp": self.dp,
                "zero_stage": self.zero_stage}


def fixed_data_parallel(parallel: ParallelConfig) -> int | None:
    """The DP degree the config pins, or None for `auto` (null means the same)."""
    return None if parallel.data_parallel in (None, "auto") else parallel.data_parallel


def data_parallel_size(parallel: ParallelConfig, world_size: int | None) -> int:
    """The DP degree: a pinned parallel.data_parallel, else the world size over TP x PP, else
    (world not known yet) 1."""
    if fixed_data_parallel(parallel) is not None:
        return parallel.data_parallel
    if world_size is None:
        return 1
    return max(1, world_size // (parallel.tensor_parallel * parallel.pipeline_parallel))


def configured_world_size(parallel: ParallelConfig) -> int:
    """The rank count the config names by itself (data_parallel auto counts as 1)."""
    return parallel.tensor_parallel * parallel.pipeline_parallel * data_parallel_size(parallel, None)


def world_problems(parallel: ParallelConfig, world_size: int | None) -> list[Problem]:
    tp, pp, dp = parallel.tensor_parallel, parallel.pipeline_parallel, fixed_data_parallel(parallel)
    if world_size is None:
        return []
    if dp is not None and tp * pp * dp != world_size:
        fix = f"launch {tp * pp * dp} ranks"
        if world_size % (tp * pp) == 0:
            fix = f"set parallel.data_parallel to auto (here {world_size // (tp * pp)}), or " + fix
        return [("world_size", world_size, f"must equal parallel.tensor_parallel ({tp}) x "
                 f"parallel.pipeline_parallel ({pp}) x parallel.data_parallel ({dp}) = {tp * pp * dp}; {fix}")]
    if dp is None and world_size % (tp * pp) != 0:
        return [("world_size", world_size, f"must be a multiple of parallel.tensor_parallel ({tp}) x "
                 f"parallel.pipeline_parallel ({pp}) = {tp * pp} (parallel.data_parallel auto is the world over "
                 f"TP x PP); launch a multiple of {tp * pp} ranks or change the layout")]
    return []


def zero_stage_of(parallel: ParallelConfig) -> int:
    """The ZeRO stage: a config composed by gridtrain.launcher.config never leaves it null; code
    that builds a ParallelConfig itself gets ZeRO-0 by leaving it out."""
    return 0 if parallel.zero_stage is None else parallel.zero_stage


def zero_problems(parallel: ParallelConfig) -> list[Problem]:
    stage, pp = zero_stage_of(parallel), parallel.pipeline_parallel
    if stage in (2, 3) and pp > 1:
        return [("parallel.zero_stage", stage, f"DeepSpeed's pipeline engine refuses ZeRO-2/3 with "
                 f"parallel.pipeline_parallel ({pp}) > 1; use zero_stage 0 or 1 with pipelines, or pipeline_parallel 1 for ZeRO-2/3")]
    return []


def batch_problems(parallel: ParallelConfig, micro_batch_size: int, global_batch_size: int,
                   world_size: int | None) -> list[Problem]:
    dp = data_parallel_size(parallel, world_size)
    per_step = micro_batch_size * dp
    if global_batch_size % per_step == 0:
        return []
    lower = per_step * max(1, global_batch_size // per_step)
    return [("train.global_batch_size", global_batch_size, f"must be a multiple of train.micro_batch_size "
             f"({micro_batch_size}) x data_parallel ({dp}) = {per_step}: every DP rank accumulates whole "
             f"micro-batches; use {lower} or {lower + per_step}, or change micro_batch_size")]


def build_layout(parallel: ParallelConfig, micro_batch_size: int, global_batch_size: int,
                 world_size: int | None) -> Layout:
    """The Layout of `parallel` on `world_size` ranks (None: the world the config names), or one
    ConfigError listing every broken rule. Degrees must already be >= 1 (validate's bounds)."""
    problems = world_problems(parallel, world_size) + zero_problems(parallel)
    problems += batch_problems(parallel, micro_batch_size, global_batch_size, world_size)
    if problems:
        raise ConfigError(problems)
    return Layout(tp=parallel.tensor_parallel, pp=parallel.pipeline_parallel,
                  dp=data_parallel_size(parallel, world_size), zero_stage=zero_stage_of(parallel),
                  micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                  pipeline_partition=parallel.pipeline_partition)
