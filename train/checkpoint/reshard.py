"""Resuming under another layout (TP, PP or DP changed) through DeepSpeed's universal checkpoint:
a layout-free form with, per parameter, the full fp32 master weight and both Adam moments.

At save time every rank adds `universal_checkpoint_info` to DeepSpeed's client state: how each
parameter is split over TP (replicated, row-parallel = concatenated along dim 1, vocab-padded,
otherwise dim 0), read from megatron-core's own parameter attributes and merged over all ranks so
every stage's parameters are described. At resume, if the saved layout differs, rank 0 converts the
checkpoint's DeepSpeed files with DeepSpeed's ds_to_universal (in process, cached next to the run's
checkpoints), and every rank loads its new shard from it with DeepSpeed's load_universal path. No
offline step for the user. Which layout changes DeepSpeed can load is decided by `reshard_refusal`
alone (gridtrain.train.checkpoint.layout_change), for the trainer and for `gridtrain checkpoint
reshard`."""
import shutil
from pathlib import Path

from gridtrain.model.naming import is_vocab_parameter
from gridtrain.parallel.collectives import all_gather_object, barrier, broadcast_object, rank_and_world
from gridtrain.parallel.deepspeed_compat import ds_to_universal, universal_checkpoint_info
from gridtrain.parallel.deepspeed_compat import load_universal as load_universal_into
from gridtrain.train.checkpoint.store import CheckpointError


def _param_kind(name: str, param, num_layers: int) -> str:
    if not getattr(param, "tensor_model_parallel", False):
        return "replicated"
    if getattr(param, "partition_dim", 0) == 1:
        return "row"
    if is_vocab_parameter(name, num_layers):
        return "vocab"
    return "column"


def universal_info(ds_engine, vocab_size: int, num_layers: int) -> dict:
    """DeepSpeed's universal_checkpoint_info for this model, identical on every rank. Collective."""
    local = {name: _param_kind(name, p, num_layers) for name, p in ds_engine.module.named_parameters()}
    kinds = {}
    for part in all_gather_object(local):
        kinds.update(part)
    return universal_checkpoint_info(kinds, vocab_size)


def universal_workdir(ckpt_dir: Path, source: Path) -> Path:
    """Where the conversion goes: a temp name, so a crash leaves nothing that looks published and
    the next start-up's stale-temp cleanup removes it."""
    return Path(ckpt_dir) / f".tmp-universal-{source.name}"


def convert(source: Path, out: Path, ds_tag: str) -> None:
    """Rank 0 converts `<source>/<ds_tag>` into `<out>/<ds_tag>`; all ranks wait. Any failure of
    the conversion becomes one CheckpointError on every rank (no rank is left waiting)."""
    error = None
    if rank_and_world()[0] == 0:
        tmp = out.with_name(out.name + "-partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ds_to_universal(source / ds_tag, tmp / "out" / ds_tag, scratch=tmp / "input")
            shutil.rmtree(out, ignore_errors=True)
            (tmp / "out").rename(out)
        except Exception as exc:  # noqa: BLE001 - a third-party converter; report, never hang peers
            error = f"converting {source} to a universal checkpoint failed: {type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    error = broadcast_object(error)
    if error is not None:
        raise CheckpointError(error + "; resume with the saved layout instead")
    barrier()


def load_universal(ds_engine, universal: Path, ds_tag: str) -> None:
    """Load a universal checkpoint into an engine of the new layout (ZeRO 1-3 or pipeline + ZeRO-1)."""
    if not load_universal_into(ds_engine, universal, ds_tag):
        raise CheckpointError(f"{universal}: DeepSpeed found no universal checkpoint under {ds_tag}")
