"""Resuming under another layout (TP, PP or DP changed) through DeepSpeed's universal checkpoint:
a layout-free form with, per parameter, the full fp32 master weight and both Adam moments.

At save time every rank adds `universal_checkpoint_info` to DeepSpeed's client state: how each
parameter is split over TP (replicated, row-parallel = concatenated along dim 1, vocab-padded,
otherwise dim 0), read from megatron-core's own parameter attributes and merged over all ranks so
every stage's parameters are described. At resume, if the saved layout differs, rank 0 converts the
checkpoint's DeepSpeed files with DeepSpeed's ds_to_universal (in process, cached next to the run's
checkpoints), and every rank loads its new shard from it with DeepSpeed's load_universal path. No
offline step for the user. Which layout changes DeepSpeed can load is decided by `reshard_refusal`
alone, for the trainer and for `gridtrain checkpoint reshard`."""
import re
import shutil
from pathlib import Path

from gridtrain.model.naming import is_vocab_parameter
from gridtrain.parallel.collectives import all_gather_object, barrier, broadcast_object, rank_and_world
from gridtrain.train.checkpoint.store import CheckpointError

UNIVERSAL_KEY = "universal_checkpoint_info"


def describe(layout: dict) -> str:
    """A manifest's layout record in words: "TP 1 x PP 2 x DP 2, ZeRO 1"."""
    return f"TP {layout['tp']} x PP {layout['pp']} x DP {layout['dp']}, ZeRO {layout['zero_stage']}"


def same_shards(saved: dict, now: dict) -> bool:
    """Whether a checkpoint's files load natively into `now`: same TP and PP, and the same DP
    unless neither uses ZeRO (then every DP rank holds the full optimizer state)."""
    if saved["tp"] != now["tp"] or saved["pp"] != now["pp"]:
        return False
    return saved["dp"] == now["dp"] or (saved["zero_stage"] == 0 and now["zero_stage"] == 0)


def reshard_refusal(saved: dict, now: dict, path: Path) -> str | None:
    """Why the checkpoint at `path`, saved under layout record `saved`, cannot be resumed into
    layout record `now` (which needs resharding), or None if DeepSpeed can do it."""
    if saved["zero_stage"] == 0:
        return (f"{path} was saved with {describe(saved)} and this run uses {describe(now)}; "
                "resharding reads ZeRO optimizer files, which a ZeRO-0 checkpoint lacks: resume with "
                "the saved layout (or save with parallel.zero_stage >= 1 to change layouts later)")
    if (saved["zero_stage"] == 3) != (now["zero_stage"] == 3):
        # DeepSpeed 0.19.8's universal form differs between ZeRO-3 and ZeRO 1/2 (ds_to_universal
        # writes mp_rank_* model files and per-parameter steps only for 1/2, zero_pp_rank_* only
        # for 3), and each engine reads only its own.
        return (f"parallel.zero_stage={now['zero_stage']}: {path} was saved with {describe(saved)}; "
                "DeepSpeed resumes a ZeRO-3 checkpoint under another layout only into ZeRO-3 and a "
                f"ZeRO 1/2 one only into ZeRO 1/2: set parallel.zero_stage="
                f"{'3' if saved['zero_stage'] == 3 else '1 or 2'}, or resume with the saved layout")
    if now["zero_stage"] == 3 and max(saved["tp"], now["tp"]) > 1:
        # ds_to_universal merges TP slices into full weights, but the ZeRO-3 loader
        # (stage3.py load_hp_checkpoint_state) splits them again only for DeepSpeed AutoTP
        # parameters, not for megatron-core's: it would fill the shards with the wrong values.
        return (f"parallel.tensor_parallel={now['tp']}: {path} was saved with {describe(saved)}; "
                "DeepSpeed changes the layout of a ZeRO-3 checkpoint only between runs at "
                "tensor_parallel=1 (any DP size): resume with the saved layout")
    if now["zero_stage"] == 0 and now.get("dtype") != "bf16":
        # DeepSpeed restores universal checkpoints only into its ZeRO and bf16 optimizers.
        return (f"parallel.zero_stage=0: resuming {path} ({describe(saved)}) under another layout needs "
                "a ZeRO optimizer in the new run; set parallel.zero_stage >= 1")
    return None


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
    exact = lambda kind: [f"^{re.escape(n)}$" for n, k in sorted(kinds.items()) if k == kind]  # noqa: E731
    return {
        "universal_checkpoint_version": 0.2,
        "original_vocab_size": vocab_size,
        "tp_replicated_parameter_patterns": exact("replicated"),
        "parameter_with_row_parallelism_patterns": exact("row"),
        "vocabulary_parameter_patterns": exact("vocab"),
    }


def universal_workdir(ckpt_dir: Path, source: Path) -> Path:
    """Where the conversion goes: a temp name, so a crash leaves nothing that looks published and
    the next start-up's stale-temp cleanup removes it."""
    return Path(ckpt_dir) / f".tmp-universal-{source.name}"


def convert(source: Path, out: Path, ds_tag: str) -> None:
    """Rank 0 converts `<source>/<ds_tag>` into `<out>/<ds_tag>`; all ranks wait. Any failure of
    the conversion becomes one CheckpointError on every rank (no rank is left waiting)."""
    from gridtrain.parallel.deepspeed_compat import ds_to_universal

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
    from gridtrain.parallel.deepspeed_compat import load_universal as load

    if not load(ds_engine, universal, ds_tag):
        raise CheckpointError(f"{universal}: DeepSpeed found no universal checkpoint under {ds_tag}")
