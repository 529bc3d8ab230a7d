"""The few world-group collectives outside the engine (checkpoints, stop requests, metrics); each
degrades to the single-process answer when no process group exists (tools, one-rank tests).
Tensors travel on the device the backend needs: CUDA for NCCL, the CPU for gloo."""
import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _active() else (0, 1)


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank iff `flag` is true on some rank. One tiny all-reduce."""
    if not _active():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(value: float) -> float:
    """The sum of every rank's `value`, on every rank."""
    if not _active():
        return float(value)
    total = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return float(total.item())


def gather_ints(value: int) -> list[int]:
    """Every rank's integer `value`, in rank order, on every rank."""
    if not _active():
        return [int(value)]
    local = torch.tensor([value], dtype=torch.int64, device=_device())
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [int(t.item()) for t in gathered]
