"""Every use of DeepSpeed's internals, and every repair of its behaviour, in one place. Each was
read and tested against DeepSpeed 0.19.8, the only version gridtrain accepts (pyproject pins it,
and `check_deepspeed_version` refuses another at start-up): private attributes and undocumented
behaviour change between releases without notice.

Lazy imports: DeepSpeed and torch are imported inside the functions (about 3.5 s together, measured),
because the CLI imports this module for the version check before any rank starts."""
import contextlib
import functools
import io
import os
import re
import sys
import tempfile
import time
from argparse import Namespace
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from gridtrain.errors import UserError

SUPPORTED_DEEPSPEED = "0.19.8"


def version_problem(installed: str | None) -> str | None:
    """One line if `installed` (None: not installed) is not the supported DeepSpeed, else None."""
    if installed == SUPPORTED_DEEPSPEED:
        return None
    found = f"deepspeed {installed} is installed" if installed else "deepspeed is not installed"
    return (f"{found}; gridtrain supports deepspeed {SUPPORTED_DEEPSPEED} only (its uses of DeepSpeed "
            f"internals were checked against it): pip install deepspeed=={SUPPORTED_DEEPSPEED}")


def check_deepspeed_version() -> None:
    """Raise UserError unless the supported DeepSpeed is installed (reads package metadata only)."""
    try:
        installed = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        installed = None
    problem = version_problem(installed)
    if problem:
        raise UserError(problem)


# ---- the CPU communication op -------------------------------------------------------------------
# DeepSpeed 0.19.8's CPU accelerator loads its shared-memory allreduce op (ShareMemCommBuilder,
# `deepspeed_shm_comm`) in every TorchBackend (deepspeed/comm/torch.py, build_shm_op): torch JIT-
# builds it on first use (20-60 s here) under ~/.cache/torch_extensions, printing nothing. Every
# loading process takes torch's FileBaton, a `lock` file created with O_EXCL and held open until it
# is removed; a process killed in between leaves the file behind, and every later load waits for it
# forever without a word (seen here: generate and training runs hung until it was removed by hand).

def _extensions_dir() -> None:
    """Build the op inside this environment (TORCH_EXTENSIONS_DIR=<sys.prefix>/torch_extensions,
    unless set or not writable): `make` builds it once when it sets up the environment, and two
    environments no longer rebuild over each other's copy (their include paths differ)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")


def lock_holders(lock: Path) -> list[int]:
    """PIDs of the processes that have `lock` open (/proc/PID/fd), i.e. the one building or loading."""
    holders, target = [], str(lock)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                holders.append(int(proc.name))
        except OSError:  # the process ended, or is not ours to read
            continue
    return holders


def wait_for_build_lock(lock: Path, say, quiet_s: float = 5.0) -> None:
    """Wait while a living process holds torch's build `lock` (saying so after `quiet_s`: ranks
    of one node take turns loading the op, which is normal), and remove it when none does (its
    holder died). A lock nobody holds is looked at twice a second apart: a holder releasing the
    baton closes the file before it removes it."""
    if not Path("/proc/self/fd").is_dir():
        return  # no /proc: torch's own wait
    started, said, unheld = time.monotonic(), False, 0
    while lock.exists():
        holders = lock_holders(lock)
        unheld = 0 if holders else unheld + 1
        if unheld >= 2:
            try:
                lock.unlink()
            except FileNotFoundError:
                return
            say(f"removed {lock}: a build lock no living process holds, left by a start-up that was interrupted")
            return
        if holders and not said and time.monotonic() - started > quiet_s:
            say(f"waiting for process {holders[0]}, which holds {lock} (building or loading DeepSpeed's CPU "
                "communication op)")
            said = True
        time.sleep(1.0 if not holders else 0.2)


def prepare_shm_comm_op(world_size: int, say) -> None:
    """Before DeepSpeed's comm backend starts: with one rank, tell DeepSpeed the op is unavailable
    (an allreduce over one rank needs none, and generation and one-rank tools then never build or
    wait for it); with several, clear a stale build lock, say when a build is due, and load it
    (DeepSpeed's own load then returns the loaded module from its cache)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    if world_size == 1:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False  # build_shm_op then returns None
        return
    _extensions_dir()
    build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
    wait_for_build_lock(build_dir / "lock", say)
    if not any(build_dir.glob("*.so")):
        say(f"building DeepSpeed's CPU communication op {builder.NAME} into {build_dir} (once per environment; "
            "20-60 s on 2 cores)")
    with contextlib.redirect_stdout(sys.stderr):  # ninja's output is no business of stdout
        builder.load(verbose=False)


# ---- process groups ----------------------------------------------------------------------------

def pipeline_topology(pp: int, tp: int, dp: int):
    """DeepSpeed 0.19.8's PipeModelDataParallelTopology (deepspeed.runtime.pipe.topology): axes
    pipe, data, model with model fastest, the order megatron-core's "tp-cp-ep-dp-pp" groups use too
    (gridtrain.parallel.groups checks the agreement at start-up). Its `get_coord(rank)` gives
    .pipe/.data/.model and `get_axis_comm_lists(axis)` the rank lists of each group."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)


# ---- checkpoint writing ------------------------------------------------------------------------

def is_torch_checkpoint_engine(checkpoint_engine) -> bool:
    """Whether DeepSpeed writes through its plain torch.save engine (TorchCheckpointEngine, the
    default without Nebula / fast writers), which gridtrain may then replace by an equivalent
    writer. Exact type: a subclass may write differently.

    Asynchronous saves are gridtrain's own (host copy + writer thread) because none of 0.19.8's
    other engines fits: FastCheckpointEngine and DecoupledCheckpointEngine (a writer process fed
    through a queue, committed at the next save) write through the async_io op, which needs
    libaio (`AsyncIOBuilder().is_compatible()` is False on these machines) and bypasses the
    hashing + fsync + manifest protocol a published checkpoint relies on; DataStatesCheckpointEngine
    needs the external `datastates` package."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return type(checkpoint_engine) is TorchCheckpointEngine


def torch_save_options(checkpoint_engine) -> dict:
    """The torch.save keyword arguments DeepSpeed 0.19.8's TorchCheckpointEngine writes with (its
    `zipfile_serialization` attribute), for a writer standing in for it."""
    return {"_use_new_zipfile_serialization": checkpoint_engine.zipfile_serialization}


@contextmanager
def writes_through(ds_engine, writer, on_copy_error):
    """For the duration of one save_checkpoint, route DeepSpeed's file writes through `writer`,
    which offers what 0.19.8's save path calls on `engine.checkpoint_engine`: `save(state_dict,
    path)` and `makedirs(path, exist_ok)` (anything else it may delegate to the engine it wraps).
    DeepSpeed 0.19.8 writes every model/optimizer file through `engine.checkpoint_engine.save`,
    except rank 0's copy of zero_to_fp32.py (`engine._copy_recovery_script`, plain file I/O),
    whose OSError is handed to `on_copy_error` instead of leaving the other ranks' collectives
    unmatched."""
    inner = ds_engine.checkpoint_engine
    original_copy = ds_engine._copy_recovery_script

    def guarded_copy(save_path):
        try:
            original_copy(save_path)
        except OSError as exc:
            on_copy_error(save_path, exc)

    ds_engine.checkpoint_engine = writer
    ds_engine._copy_recovery_script = guarded_copy
    try:
        yield inner
    finally:
        ds_engine.checkpoint_engine = inner
        del ds_engine._copy_recovery_script  # the instance attribute shadowed the bound method


# ---- universal checkpoints (resuming under another layout) -------------------------------------

# DeepSpeed's client-state key and layout of universal_checkpoint_info (0.19.8,
# deepspeed/checkpoint/constants.py and ds_to_universal.py): parameter-name regex lists per kind
# of TP split, and the vocabulary size without padding.
UNIVERSAL_KEY = "universal_checkpoint_info"
_PATTERN_KEYS = {"replicated": "tp_replicated_parameter_patterns", "row": "parameter_with_row_parallelism_patterns",
                 "vocab": "vocabulary_parameter_patterns"}


def universal_checkpoint_info(kinds: dict[str, str], vocab_size: int) -> dict:
    """universal_checkpoint_info for parameters named in `kinds` ("replicated", "row", "vocab" or
    "column", the default split along dim 0 that needs no pattern), each as an exact-name regex."""
    info = {"universal_checkpoint_version": 0.2, "original_vocab_size": vocab_size}
    for kind, key in _PATTERN_KEYS.items():
        info[key] = [f"^{re.escape(name)}$" for name, k in sorted(kinds.items()) if k == kind]
    return info


def universal_split_kinds(info: dict) -> tuple[dict[str, str], int]:
    """(name -> kind, unpadded vocab size) of an info universal_checkpoint_info wrote."""
    kinds = {}
    for kind, key in _PATTERN_KEYS.items():
        for pattern in info.get(key, []):
            kinds[re.sub(r"^\^|\$$", "", pattern).replace("\\", "")] = kind
    return kinds, info["original_vocab_size"]


def ds_to_universal(source_ds, output, scratch) -> None:
    """deepspeed.checkpoint.ds_to_universal of the DeepSpeed folder `source_ds` into `output`.
    0.19.8's converter copies every `module` state-dict entry and fails on the None values that
    megatron-core layers store as `_extra_state`: it reads model-states files re-saved without
    them (in `scratch`) and every other file through a symlink."""
    import torch
    from deepspeed.checkpoint.ds_to_universal import main as convert

    scratch = Path(scratch)
    scratch.mkdir(parents=True)
    for path in sorted(Path(source_ds).iterdir()):
        target = scratch / path.name
        if not path.name.startswith("mp_rank_"):
            target.symlink_to(path.resolve())
            continue
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state.get("module"), dict):
            state["module"] = {k: v for k, v in state["module"].items() if v is not None}
        torch.save(state, target)
    convert(Namespace(input_folder=str(scratch), output_folder=str(output), num_extract_workers=1,
                      num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))


def load_universal(ds_engine, universal, tag: str) -> bool:
    """Load a universal checkpoint into `ds_engine` (ZeRO 1-3, or pipeline + ZeRO-1); False if
    DeepSpeed found nothing under `tag`. 0.19.8 reads the universal flag from the engine's config
    object at load time (`engine._config.load_universal_checkpoint`), so it is set just for this."""
    config = ds_engine._config
    zero3 = ds_engine.zero_optimization_partition_weights()
    groups = ds_engine.optimizer.param_groups if zero3 else []
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in groups]
    config.load_universal_checkpoint = True
    try:
        load_path, _ = ds_engine.load_checkpoint(str(universal), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = False
    if load_path is None:
        return False
    if zero3:
        _repair_zero3_universal_load(ds_engine, groups, hyper)
    return True


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


# ---- training ----------------------------------------------------------------------------------

def record_global_grad_norm(optimizer, norm: float) -> None:
    """Where DeepSpeed 0.19.8's engine.get_global_grad_norm() reads a client optimizer's norm
    (`optimizer._global_grad_norm`), for the fp32 ZeRO-0 path where gridtrain clips itself."""
    optimizer._global_grad_norm = norm


def is_pipeline_tied_copy(param) -> bool:
    """Whether `param` belongs to a module DeepSpeed's PipelineModule ties across stages (0.19.8
    marks those parameters `ds_pipe_replicated`): each stage holding it has a copy."""
    return bool(getattr(param, "ds_pipe_replicated", False))


@functools.cache
def _counted_pipeline_module():
    from deepspeed.pipe import PipelineModule

    class CountedPipelineModule(PipelineModule):
        """PipelineModule whose partition_method="parameters" balances given per-layer counts.
        0.19.8's `_count_layer_params` (called inside __init__ by `_partition_layers`) builds every
        layer on every rank to count it: with megatron-core's CPU initialisation that is the whole
        model's full weights on each rank of a 70B run."""

        def __init__(self, layer_counts: list[int], **kwargs):
            self._layer_counts = list(layer_counts)  # read inside super().__init__
            super().__init__(**kwargs)

        def _count_layer_params(self) -> list[int]:
            return list(self._layer_counts)

    return CountedPipelineModule


def pipeline_module(layer_counts: list[int], **kwargs):
    """A DeepSpeed PipelineModule(**kwargs) partitioned by `layer_counts` instead of built layers."""
    return _counted_pipeline_module()(layer_counts, **kwargs)


def forget_comm_backend() -> None:
    """deepspeed.comm caches the backend wrapping the world group (`deepspeed.comm.comm.cdb`);
    after the group is destroyed it must be dropped, or the next init_distributed reuses it."""
    import deepspeed.comm.comm as ds_comm

    ds_comm.cdb = None


# ---- reading checkpoint files offline ----------------------------------------------------------
# DeepSpeed 0.19.8's checkpoint folder (<checkpoint>/ds): per model-parallel rank XX (the rank in the
# TP x PP group, pipeline stage major) "mp_rank_XX_model_states.pt" (ZeRO-3: one
# "zero_pp_rank_D_mp_rank_XX_model_states.pt" per DP rank D) holding the module's state dict (None
# for a pipeline) and the client state; "zero_pp_rank_D_mp_rank_XX_optim_states.pt" per DP rank for
# ZeRO >= 1; for a pipeline, "layer_NN-model_TT-model_states.pt" per layer NN and TP rank TT.

def checkpoint_file_kind(relpath: str) -> str:
    """"optimizer", "model" or "other" for a file of a checkpoint, by DeepSpeed's file names."""
    name = relpath.rsplit("/", 1)[-1]
    if name.endswith("optim_states.pt"):
        return "optimizer"
    if name.endswith("model_states.pt"):
        return "model"
    return "other"


def model_states_file(ds_dir, mp_rank: int, zero_stage: int):
    prefix = "zero_pp_rank_0_" if zero_stage == 3 else ""
    return Path(ds_dir) / f"{prefix}mp_rank_{mp_rank:02d}_model_states.pt"


def pipeline_layer_files(ds_dir) -> dict[tuple[int, int], object]:
    """(layer index, TP rank) -> the file a pipeline stage wrote that layer's state dict to."""
    found = {}
    for path in Path(ds_dir).glob("layer_*-model_states.pt"):
        match = re.fullmatch(r"layer_(\d+)-model_(\d+)-model_states\.pt", path.name)
        if match:
            found[int(match.group(1)), int(match.group(2))] = path
    return found


def zero_fp32_weights(ds_dir, mp_rank: int) -> dict:
    """The fp32 master weights of one model-parallel rank, merged over its DP partitions by
    DeepSpeed's zero_to_fp32 (ZeRO 1-3 at PP=1), lazily: values are memory-mapped tensors or
    zero_to_fp32's pseudo tensors, each with .shape and .contiguous(). zero_to_fp32 takes every
    *_optim_states.pt of a folder as one rank's partitions, so each model-parallel rank's files
    are linked into a scratch folder of their own; it reports progress on stdout/stderr, which is
    silenced."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mark = f"mp_rank_{mp_rank:02d}_"
    with tempfile.TemporaryDirectory(prefix="gridtrain-zero-") as scratch:
        folder = Path(scratch) / "ds"
        folder.mkdir()
        for path in Path(ds_dir).iterdir():
            if path.name.startswith(mark) or f"_{mark}" in path.name:
                (folder / path.name).symlink_to(path.resolve())
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            return get_fp32_state_dict_from_zero_checkpoint(scratch, tag="ds", lazy_mode=True)
