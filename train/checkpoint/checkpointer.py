"""Checkpointer: the trainer's view of checkpoints. `resume(engine, mode)` at start-up finds the
newest checkpoint whose manifest verifies (or the one `mode` names) and restores DeepSpeed's model +
optimizer shards, the RNG states and the TrainState; `maybe_save(engine, state)` after each step
saves every `checkpoint.interval_steps` steps and/or `checkpoint.interval_minutes` minutes, or when
forced (a stop request, the last step). Both are collective: every rank calls them at the same
point. With `checkpoint.async_save` an interval save is written in the background: at most one is
in flight, and it is published at the first step at which every rank's files are durable, or
before the next save, a forced save or the end of the run, whichever comes first."""
import dataclasses
import json
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from gridtrain.data.tokenizer import load_tokenizer
from gridtrain.model.config import ModelConfig
from gridtrain.parallel.collectives import all_gather_object, any_rank, barrier, broadcast_object, rank_and_world
from gridtrain.parallel.deepspeed_compat import UNIVERSAL_KEY
from gridtrain.parallel.layout import Layout
from gridtrain.train.checkpoint.config import CheckpointConfig
from gridtrain.train.checkpoint.layout_change import describe, reshard_refusal, same_shards
from gridtrain.train.checkpoint.manifest import MANIFEST_NAME, STATE_NAME, read_manifest, verify_checkpoint
from gridtrain.train.checkpoint.reshard import convert, load_universal, universal_info, universal_workdir
from gridtrain.train.checkpoint.rng import restore_rng_state
from gridtrain.train.checkpoint.save import (
    DS_TAG,
    HostStaging,
    PendingSave,
    SaveContext,
    SaveResult,
    finish_save,
    note,
    rng_file,
    start_save,
)
from gridtrain.train.checkpoint.state import TrainState
from gridtrain.train.checkpoint.store import (
    BackgroundDeleter,
    CheckpointError,
    candidates,
    choose_valid,
    find_resumable,
    list_checkpoints,
    remove_stale_temps,
)


@dataclass(frozen=True)
class RunRecord:
    """What the checkpoints of one run record besides tensors, and where they go: the model (its
    parameters' TP split is described for resharding), the precision, the tokenizer copied into
    each checkpoint and the resolved run config."""
    ckpt_dir: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    dtype: str = "fp32"
    tokenizer: str | None = None
    config: dict = field(default_factory=dict)


SHARED_WAIT_S = 10.0


def _appears(path: Path, within: float) -> bool:
    deadline = time.monotonic() + within
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def library_versions() -> dict:
    found = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("gridtrain", "deepspeed", "megatron-core"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def verify_together(path: Path) -> list[str]:
    """verify_checkpoint with every rank checksumming a share of the files. Collective."""
    rank, world = rank_and_world()
    problems = verify_checkpoint(path, checksums=True, share=(rank, world))
    return sorted({p for part in all_gather_object(problems) for p in part})


def _ds(engine):
    """gridtrain's TrainEngine wraps the DeepSpeed engine; DeepSpeed engines are accepted as is."""
    return getattr(engine, "ds_engine", engine)


class Checkpointer:
    """Checkpoints of one run with `layout`, as `cfg` (the checkpoint section) asks."""

    def __init__(self, cfg: CheckpointConfig, layout: Layout, run: RunRecord):
        self.cfg = cfg
        self.run = run
        self.dir = Path(run.ckpt_dir)
        self.save_context = SaveContext(
            ckpt_dir=self.dir, layout={**layout.record(), "dtype": run.dtype},
            config={**run.config, "model": dataclasses.asdict(run.model)},  # readers rebuild the model from it
            versions=library_versions(), keep_last=cfg.keep_last, keep_every=cfg.keep_every,
            tokenizer_files=tuple(load_tokenizer(run.tokenizer).files()) if run.tokenizer else ())
        self.last_saved_step: int | None = None
        self.last_result: SaveResult | None = None
        self._last_save_time = time.monotonic()
        self._universal_info: dict | None = None
        self.deleter = BackgroundDeleter()  # retired checkpoints go on its thread (rank 0)
        self._pending: PendingSave | None = None  # the save in flight
        self._staging = HostStaging() if cfg.async_save else None

    def check_shared(self) -> None:
        """Collective, at start-up: every rank must see what rank 0 writes in checkpoint.dir (all
        ranks write each save there and rank 0 publishes it). Ranks on rank 0's host see it by
        construction; the others look for a file rank 0 writes, for up to SHARED_WAIT_S (NFS
        clients cache a missing name for a few seconds). Raises CheckpointError on every rank."""
        rank, _ = rank_and_world()
        hosts = all_gather_object(socket.gethostname())
        if len(set(hosts)) == 1:
            return
        marker, error = None, None
        if rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                marker = self.dir / f".shared-check-{uuid.uuid4().hex}"
                marker.write_text(hosts[0], encoding="utf-8")
            except OSError as exc:
                error = f"checkpoint.dir={str(self.dir)!r}: cannot write there on {hosts[0]} ({exc})"
        marker, error = broadcast_object((marker and str(marker), error))
        if error:
            raise CheckpointError(error + "; fix its permissions or set checkpoint.dir elsewhere")
        seen = all_gather_object(hosts[rank] == hosts[0] or _appears(Path(marker), SHARED_WAIT_S))
        if rank == 0:
            Path(marker).unlink(missing_ok=True)
        blind = sorted({host for host, ok in zip(hosts, seen) if not ok})
        if blind:
            raise CheckpointError(
                f"checkpoint.dir={str(self.dir)!r} is not shared by every node: ranks on {', '.join(blind)} do not "
                f"see the file rank 0 wrote there on {hosts[0]}; put checkpoint.dir (or train.run_dir) on a "
                "filesystem every node mounts (NFS, Lustre, GPFS)")

    # ---- saving -------------------------------------------------------------------------------

    def maybe_save(self, engine, state: TrainState, force: bool = False) -> list[SaveResult]:
        """Save if forced or an interval is due; a forced save is synchronous (a stop request's
        save is published before the process exits). Also publishes the save in flight once every
        rank has written it. Returns the saves published during this call, oldest first."""
        due = state.step != self.last_saved_step and (force or self._due(state.step))
        published = []
        # `due` is the same on every rank, so every rank reaches the collective or none does.
        if self._pending is not None and (due or not any_rank(not self._pending.done())):
            published.append(self._finish())
        if due:
            background = self.cfg.async_save and not force
            self._start(engine, state, background)
            if not background:
                published.append(self._finish())
        return published

    @property
    def in_flight(self) -> int | None:
        """The step of the save being written in the background, if any."""
        return self._pending.step if self._pending is not None else None

    def _due(self, step: int) -> bool:
        ckpt = self.cfg
        if ckpt.interval_steps > 0 and step % ckpt.interval_steps == 0:
            return True
        if ckpt.interval_minutes > 0:
            # Clocks differ per rank: any rank past the interval decides for all (a collective,
            # run only when time-based saving is on).
            return any_rank(time.monotonic() - self._last_save_time >= ckpt.interval_minutes * 60)
        return False

    def save(self, engine, state: TrainState) -> SaveResult:
        """A synchronous save of `state` (after publishing any save in flight)."""
        self.close()
        self._start(engine, state, background=False)
        return self._finish()

    def close(self) -> list[SaveResult]:
        """Publish the save in flight, if any (waits for its writes). Collective."""
        return [self._finish()] if self._pending is not None else []

    def abandon(self) -> None:
        """After a failure: wait for this rank's background writes without publishing them (not
        collective; the other ranks may be gone). The temporary folder is removed at the next resume."""
        if self._pending is not None:
            self._pending.writer.wait_durable()
            self._pending = None

    def _start(self, engine, state: TrainState, background: bool) -> None:
        if self._universal_info is None:  # collective, once: how each parameter splits over TP
            model = self.run.model
            self._universal_info = universal_info(_ds(engine), model.vocab_size, model.num_layers)
        self._pending = start_save(_ds(engine), state, self.save_context, self.deleter,
                                   {UNIVERSAL_KEY: self._universal_info}, self._staging if background else None)
        self.last_saved_step = state.step
        self._last_save_time = time.monotonic()

    def _finish(self) -> SaveResult:
        pending, self._pending = self._pending, None
        result = finish_save(pending, self.save_context, self.deleter)
        self.last_result = result
        return result

    # ---- resuming -----------------------------------------------------------------------------

    def resume(self, engine, mode: str = "auto") -> TrainState | None:
        """Restore the checkpoint `mode` (train.resume) asks for: "auto" (newest valid in
        checkpoint.dir, None if there is none), "none" (fresh start; refuses if checkpoints exist
        unless checkpoint.overwrite), or a path (one checkpoint, or a checkpoint folder to search)."""
        if mode == "none":
            self._start_fresh()
            return None
        if rank_and_world()[0] == 0:
            remove_stale_temps(self.dir)
        path = self._select(self.dir if mode == "auto" else Path(mode), explicit=mode != "auto")
        if path is None:
            return None
        return self._load(engine, path)

    def _start_fresh(self) -> None:
        existing = list_checkpoints(self.dir)
        if not existing:
            return
        if not self.cfg.overwrite:
            raise CheckpointError(
                f"train.resume='none': {self.dir} already holds {len(existing)} checkpoint(s) (newest "
                f"{existing[-1][1].name}); resume them (train.resume=auto), use another train.run_dir / "
                "checkpoint.dir, or set checkpoint.overwrite=true to move them aside and start fresh")
        barrier()
        if rank_and_world()[0] == 0:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            aside = self.dir.with_name(f"{self.dir.name}.replaced-{stamp}")
            self.dir.rename(aside)
            note(f"checkpoint.overwrite: moved the previous checkpoints to {aside}")
        barrier()

    def _select(self, root: Path, explicit: bool) -> Path | None:
        """The checkpoint to load, verified by all ranks together (each checksums a share of the
        files). An explicitly named single checkpoint must verify; a folder falls back to older
        checkpoints with a warning naming the bad file."""
        what = f"train.resume={str(root)!r}" if explicit else f"checkpoint.dir={str(root)!r}"
        if (root / MANIFEST_NAME).exists() or (explicit and not list_checkpoints(root)):
            chosen, rejected = choose_valid([root], verify=verify_together)
            if chosen is None:
                raise CheckpointError(f"{what}: not a valid checkpoint ({rejected[0]}); restore the files, "
                                      "pick another with --resume-from PATH, or start fresh with --no-resume")
            return chosen
        # Rank 0's listing for all: a save could publish between two ranks' directory reads.
        return find_resumable(root, verify=verify_together, what=what,
                              listed=lambda folder: broadcast_object(candidates(folder)),
                              warn=lambda message: note(f"warning: {message}"))

    def _load(self, engine, path: Path) -> TrainState:
        manifest = read_manifest(path)
        record = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        tag = record.get("ds_tag", DS_TAG)
        saved, now = manifest["layout"], self.save_context.layout
        if same_shards(saved, now):
            load_path, _ = _ds(engine).load_checkpoint(str(path), tag=tag)
            if load_path is None:
                raise CheckpointError(f"{path}: DeepSpeed found no model states under {path / tag}")
            self._restore_rng(path)
        else:
            refusal = reshard_refusal(saved, now, path)
            if refusal:
                raise CheckpointError(refusal)
            self._load_resharded(engine, path, tag, saved)
        if same_shards(saved, now) and saved["dp"] != now["dp"]:
            note(f"resuming {path} saved with {describe(saved)} as {describe(now)}: without ZeRO every DP "
                 "rank holds the whole optimizer state, so the files load as they are")
        state = TrainState.from_dict(record["train_state"])
        self.last_saved_step = state.step
        note(f"resumed from {path} (step {state.step}, {state.consumed_samples} samples consumed)")
        return state

    def _restore_rng(self, path: Path) -> None:
        rng = path / rng_file(rank_and_world()[0])
        if rng.exists():
            skipped = restore_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
            if skipped:
                note(f"warning: RNG states not restorable here: {', '.join(skipped)}")

    def _load_resharded(self, engine, path: Path, tag: str, saved: dict) -> None:
        """Another layout: convert to DeepSpeed's universal form (fp32 weights + Adam moments per
        parameter) and load this rank's new shard from it. RNG streams are per rank and cannot be
        mapped onto another layout: they keep this run's seeding."""
        work = universal_workdir(self.dir, path)
        convert(path, work, tag)
        try:
            load_universal(_ds(engine), work, tag)
        finally:
            barrier()
            if rank_and_world()[0] == 0:
                shutil.rmtree(work, ignore_errors=True)
        note(f"resharded {path} from {describe(saved)} to {describe(self.save_context.layout)} "
             "(RNG streams restart from the seed)")
