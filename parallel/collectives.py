"""The few world-group collectives outside the engine (checkpoints use them); each degrades to the
single-process answer when no process group exists (tools, single-rank tests)."""
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


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
    """True on every rank iff `flag` is true on some rank."""
    return any(all_gather_object(bool(flag)))
