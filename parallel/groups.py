"""Process groups of one run: world = TP x PP x DP.

megatron-core's parallel_state owns the groups the model's TP layers use; DeepSpeed's
PipeModelDataParallelTopology describes the same layout to the pipeline engine. Both orders put TP
fastest, then DP, then PP (megatron "tp-cp-ep-dp-pp", DeepSpeed axes pipe/data/model), and
initialize() checks at start-up that this rank's TP, DP and PP groups are identical in both.
"""
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from gridtrain.errors import UserError
from gridtrain.parallel.config import ParallelConfig
from gridtrain.parallel.deepspeed_compat import (
    check_deepspeed_version,
    forget_comm_backend,
    pipeline_topology,
    prepare_shm_comm_op,
)
from gridtrain.parallel.layout import Layout

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class MegatronMPU:
    """The `mpu` DeepSpeed expects, backed by megatron-core's parallel_state.

    DeepSpeed's "model parallel" group is every rank holding a different piece of one model
    replica (TP x PP), which is megatron's model-parallel group; megatron lacks DeepSpeed's
    get_model_parallel_rank/world_size names, hence this adapter.
    """

    def __init__(self):
        self._ps = parallel_state

    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        # DeepSpeed's model_checkpointing and utils.groups ask for the ranks, not only the group
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the layout. `mpu` is handed to deepspeed.initialize; `topology` (a
    DeepSpeed PipeModelDataParallelTopology) to the PipelineModule."""

    layout: Layout
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    backend: str
    mpu: MegatronMPU
    topology: object  # deepspeed_compat.pipeline_topology

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp


def _say(message: str) -> None:
    print(f"[gridtrain] rank {os.environ.get('RANK', '?')}: {message}", file=sys.stderr, flush=True)


def select_backend(parallel: ParallelConfig) -> tuple[torch.device, str]:
    """(device, backend): CUDA + nccl when a GPU is present, else CPU + gloo; config may force."""
    cuda = torch.cuda.is_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise UserError("parallel.backend='nccl': no CUDA device is visible; use 'gloo' or 'auto' on CPU")
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)  # before the process group, so NCCL binds the right GPU
        return torch.device("cuda", local_rank), backend
    return torch.device("cpu"), backend


def init_world(backend: str, timeout: timedelta) -> None:
    """The world process group from torchrun-style environment variables (a no-op if it exists)."""
    if dist.is_initialized():
        return
    missing = [name for name in REQUIRED_ENV if name not in os.environ]
    if missing:
        raise UserError(
            f"environment: {', '.join(missing)} not set; start ranks with `gridtrain train`, torchrun, "
            "srun or mpirun through `gridtrain launch`, which set them"
        )
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout,
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def initialize(parallel: ParallelConfig, layout: Layout) -> ParallelContext:
    """Create the world group (if needed), megatron-core's TP/PP/DP groups and DeepSpeed's topology
    for `layout` (backend and timeout from `parallel`); raise if the two disagree. Call destroy()
    before initializing another layout."""
    check_deepspeed_version()

    device, backend = select_backend(parallel)
    timeout = timedelta(minutes=parallel.timeout_minutes)
    init_world(backend, timeout)
    prepare_shm_comm_op(dist.get_world_size(), _say)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size != layout.world_size:  # the launcher validated against this world; a guard for direct callers
        raise UserError(f"world_size={world_size}: the layout {layout.describe()} needs {layout.world_size} "
                        "ranks; launch that many or change the layout")
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        # timedelta(minutes=...) inside: fractions work, and every group must give up when the world does
        distributed_timeout_minutes=parallel.timeout_minutes,
        # megatron's extra gloo groups only serve its distributed optimizer, which gridtrain does not use
        create_gloo_process_groups=False,
    )
    topology = pipeline_topology(pp, tp, dp)
    check_topology_agreement(topology, rank)
    coord = topology.get_coord(rank)
    return ParallelContext(
        layout=layout, rank=rank, tp_rank=coord.model, pp_rank=coord.pipe, dp_rank=coord.data,
        device=device, backend=backend, mpu=MegatronMPU(), topology=topology,
    )


def single_process_env() -> None:
    """The variables torchrun would give the only rank of a one-process world, where not set."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)


def initialize_single(parallel: ParallelConfig) -> ParallelContext:
    """A one-rank world (TP = PP = DP = 1) for single-process tools such as generation."""
    single_process_env()
    return initialize(parallel, Layout(tp=1, pp=1, dp=1, zero_stage=0, micro_batch_size=1, global_batch_size=1))


def check_topology_agreement(topology, rank: int) -> None:
    """Raise if megatron-core's groups for `rank` differ from DeepSpeed's topology: the pipeline
    engine would then exchange activations and gradients with ranks the TP layers do not expect."""
    megatron = {
        "model": parallel_state.get_tensor_model_parallel_group(),
        "data": parallel_state.get_data_parallel_group(),
        "pipe": parallel_state.get_pipeline_model_parallel_group(),
    }
    problems = []
    for axis, group in megatron.items():
        ours = sorted(dist.get_process_group_ranks(group))
        theirs = next(sorted(ranks) for ranks in topology.get_axis_comm_lists(axis) if rank in ranks)
        if ours != theirs:
            problems.append(f"{axis}: megatron-core {ours} vs DeepSpeed {theirs}")
    if problems:
        raise RuntimeError(f"rank {rank}: process groups of megatron-core and DeepSpeed's topology "
                           f"disagree ({'; '.join(problems)}); both must order ranks TP fastest, then DP, then PP")


def destroy(world: bool = True) -> None:
    """Tear down megatron-core's groups and, if `world`, the world group (clean shutdown). With
    world=False another layout of the same world can be initialized next (used by tests)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if world and dist.is_initialized():
        dist.destroy_process_group()
        forget_comm_backend()
