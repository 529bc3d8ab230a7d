"""Resuming under another layout (TP, PP or DP changed) through DeepSpeed's universal checkpoint:
a layout-free form with, per parameter, the full fp32 master weight and both Adam moments.

At save time every rank adds `universal_checkpoint_info` to DeepSpeed's client state: how each
parameter is split over TP (replicated, row-parallel = concatenated along dim 1, vocab-padded,
otherwise dim 0), read from megatron-core's own parameter attributes and merged over all ranks so
every stage's parameters are described. At resume, if the saved layout differs, rank 0 converts the
checkpoint's DeepSpeed files with deepspeed.checkpoint.ds_to_universal (in process, cached next to
the run's checkpoints), and every rank loads its new shard from it with DeepSpeed's
load_universal path. No offline step for the user."""
import re
import shutil
from argparse import Namespace
from pathlib import Path

from gridtrain.parallel.collectives import all_gather_object, barrier, broadcast_object, rank_and_world
from gridtrain.train.checkpoint.store import CheckpointError

UNIVERSAL_KEY = "universal_checkpoint_info"
# The word embedding and the untied head have the (TP-dependent padded) vocab as first dimension.
_VOCAB_SUFFIXES = ("word.weight", "proj.weight")


def _param_kind(name: str, param, vocab_layers: tuple) -> str:
    if not getattr(param, "tensor_model_parallel", False):
        return "replicated"
    if getattr(param, "partition_dim", 0) == 1:
        return "row"
    if name.startswith(vocab_layers) and name.endswith(_VOCAB_SUFFIXES):
        return "vocab"
    return "column"


def universal_info(ds_engine, vocab_size: int, num_layers: int) -> dict:
    """DeepSpeed's universal_checkpoint_info for this model, identical on every rank. Collective."""
    vocab_layers = ("0.", "tied_modules.", f"{num_layers + 2}.")
    local = {name: _param_kind(name, p, vocab_layers) for name, p in ds_engine.module.named_parameters()}
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


def _converter_input(source_ds: Path, scratch: Path) -> Path:
    """ds_to_universal copies every `module` state-dict entry and fails on the None values that
    megatron-core layers store as `_extra_state`: give it the model-states files without those
    entries (re-saved) and every other file as a symlink."""
    import torch

    scratch.mkdir(parents=True)
    for path in sorted(source_ds.iterdir()):
        target = scratch / path.name
        if not path.name.startswith("mp_rank_"):
            target.symlink_to(path.resolve())
            continue
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state.get("module"), dict):
            state["module"] = {k: v for k, v in state["module"].items() if v is not None}
        torch.save(state, target)
    return scratch


def convert(source: Path, out: Path, ds_tag: str) -> None:
    """Rank 0 converts `<source>/<ds_tag>` into `<out>/<ds_tag>`; all ranks wait. Any failure of
    the conversion becomes one CheckpointError on every rank (no rank is left waiting)."""
    error = None
    if rank_and_world()[0] == 0:
        tmp = out.with_name(out.name + "-partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            source_ds = _converter_input(source / ds_tag, tmp / "input")
            args = Namespace(input_folder=str(source_ds), output_folder=str(tmp / "out" / ds_tag),
                             num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                             strict=True, inject_missing_state=False)
            ds_to_universal(args)
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
    """Load a universal checkpoint into an engine of any layout (ZeRO 1-3 or pipeline + ZeRO-1):
    DeepSpeed reads the flag from its config at load time, so it is switched on just for this."""
    if not ds_engine.zero_optimization() and not ds_engine.bfloat16_enabled():
        raise CheckpointError(
            "resuming under another layout needs a ZeRO optimizer (parallel.zero_stage >= 1) in the new "
            "run: DeepSpeed restores universal checkpoints only into ZeRO / bf16 optimizers")
    config = ds_engine._config
    zero3 = ds_engine.zero_optimization_partition_weights()
    groups = ds_engine.optimizer.param_groups if zero3 else []
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in groups]
    config.load_universal_checkpoint = True
    try:
        load_path, _ = ds_engine.load_checkpoint(str(universal), tag=ds_tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = False
    if load_path is None:
        raise CheckpointError(f"{universal}: DeepSpeed found no universal checkpoint under {ds_tag}")
    if zero3:
        _repair_zero3_universal_load(ds_engine, groups, hyper)


def _repair_zero3_universal_load(ds_engine, groups: list, hyper: list) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3) leaves two faults that make the resumed
    run drift from the saved one (relative loss error 3.6e-3 by step 10 in the test):
    - it copies param_groups[0]'s hyperparameters into every group, so the no-decay group (norms)
      gets weight decay: the groups are this run's own (same model and optim config), put them back;
    - it gives every sub-group's Adam state the same `step` tensor object, which torch's Adam
      increments in place once per sub-group, so bias correction runs ahead: give each its own."""
    import torch

    for group, saved in zip(groups, hyper):
        group.update(saved)
    for state in ds_engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def reshard_rank(config_path: str) -> int:
    """One rank of `gridtrain checkpoint reshard`: build the engine of the new layout, resume the
    source checkpoint into it (converted through the universal form), save it natively."""
    import torch.distributed as dist

    from gridtrain.launcher.config import load_config
    from gridtrain.parallel.engine import build_engine
    from gridtrain.parallel.groups import initialize
    from gridtrain.train.checkpoint.checkpointer import Checkpointer

    cfg = load_config([config_path])
    ctx = initialize(cfg.parallel)
    try:
        engine = build_engine(cfg, ctx)
        checkpointer = Checkpointer(cfg, ctx)
        state = checkpointer.resume(engine)
        checkpointer.save(engine, state)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(reshard_rank(sys.argv[1]))
