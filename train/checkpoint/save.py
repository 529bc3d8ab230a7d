"""The save protocol: every rank writes its shard into one temporary folder, fsyncs and checksums
its own files; rank 0 adds the manifest last, renames the folder into place, moves `latest` and
applies retention. Any rank's failure (a full disk, say) is agreed on by all ranks, the temporary
folder is removed and the previous checkpoint stays untouched.

DeepSpeed writes its files through its own `save_checkpoint` (model states per TP/PP rank,
`zero_pp_rank_*` optimizer partitions per DP rank, `layer_*` files for pipelines) into
`<tmp>/ds/`. Its writes go through `engine.checkpoint_engine.save`; we wrap that object for the
duration of the save to learn which files this rank wrote and to catch a failed write without
leaving DeepSpeed's collectives (its trailing barrier) unmatched on the other ranks."""
import errno
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from gridtrain.parallel.collectives import all_gather_object, broadcast_object, rank_and_world
from gridtrain.train.checkpoint.manifest import (
    STATE_NAME, HashingWriter, build_manifest, digest_files, fsync_file, list_files, write_text_atomic)
from gridtrain.train.checkpoint.rng import capture_rng_state
from gridtrain.parallel.deepspeed_compat import is_torch_checkpoint_engine, writes_through
from gridtrain.train.checkpoint.store import (
    BackgroundDeleter, CheckpointError, publish, read_latest, retire, temp_path)
from gridtrain.train.state import TrainState

DS_TAG = "ds"
TOKENIZER_NAME = "tokenizer.model"
# Free space below which a failed write is reported as a full disk.
_FULL_BELOW = 4 * 2**20
# A shard being written starts the flush of what it has so far every this many bytes.
_FLUSH_EVERY = 32 * 2**20


@dataclass(frozen=True)
class SaveContext:
    """What a save records besides the engine's tensors; built once per run."""
    ckpt_dir: Path
    layout: dict
    config: dict
    versions: dict
    tokenizer: str | None = None
    keep_last: int = 0
    keep_every: int = 0


@dataclass(frozen=True)
class SaveResult:
    path: Path
    step: int
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.pt"


class _FlushingSink(HashingWriter):
    """A hashing sink that also starts an fdatasync of the bytes written so far, every
    _FLUSH_EVERY bytes, on the fsync thread: the disk then works while the rest of the shard is
    serialized, and the final fsync only has the tail left (measured 0.25 -> 0.20 s for 200 MB)."""

    def __init__(self, raw, hash_pool, fsync_pool):
        super().__init__(raw, hash_pool)
        self._fsync_pool = fsync_pool
        self._flushing = None
        self._flushed_at = 0

    def write(self, data) -> int:
        written = super().write(data)
        if self.size - self._flushed_at >= _FLUSH_EVERY and (self._flushing is None or self._flushing.done()):
            self.settle()
            self._flushed_at = self.size
            self._flushing = self._fsync_pool.submit(os.fdatasync, self._raw.fileno())
        return written

    def settle(self) -> None:
        """Wait for the flush in flight and raise its error: before the file closes, because
        its descriptor number could be reused, and because a writeback error reported here is
        not reported again to the final fsync."""
        flushing, self._flushing = self._flushing, None
        if flushing is not None:
            flushing.result()


class _RecordingWriter:
    """Stands in for DeepSpeed's checkpoint engine during one save: delegates every call, remembers
    the paths written and turns a failed write into a recorded error so DeepSpeed's control flow
    (and its collectives) continues on this rank.

    With DeepSpeed's plain torch engine it writes the file itself, as that engine would
    (torch.save, same serialization), but hashes the bytes as they are written and fsyncs each
    finished file on a thread while the next one is serialized: a save then never reads its
    shards back, and the disk flush overlaps the CPU work instead of following it."""

    def __init__(self, inner):
        self._inner = inner
        self.paths: list[str] = []
        self.digests: dict[str, tuple[int, str]] = {}
        self.error: str | None = None
        self._hashing = is_torch_checkpoint_engine(inner)
        self._fsync = ThreadPoolExecutor(max_workers=1) if self._hashing else None
        self._hash = ThreadPoolExecutor(max_workers=1) if self._hashing else None
        self._pending = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def save(self, state_dict, path):
        if self.error is not None:
            return None
        try:
            if self._hashing:
                result = None
                with open(path, "wb") as raw:
                    sink = _FlushingSink(raw, self._hash, self._fsync)
                    try:
                        with _zip_crc32_off():
                            torch.save(state_dict, sink, _use_new_zipfile_serialization=self._inner.zipfile_serialization)
                    finally:
                        sink.settle()
                self.digests[str(path)] = (sink.size, sink.hexdigest())
                self._pending.append((path, self._fsync.submit(fsync_file, path)))
            else:
                result = self._inner.save(state_dict, path)
        except (OSError, RuntimeError) as exc:  # torch's zip writer reports ENOSPC as RuntimeError
            self.error = _describe_write_error(path, exc)
            return None
        self.paths.append(str(path))
        return result

    def wait_durable(self) -> None:
        """Wait for the fsyncs started by `save`; a failed one becomes this rank's error."""
        if self._fsync is None:
            return
        for path, future in self._pending:
            try:
                future.result()
            except OSError as exc:
                self.error = self.error or f"fsync of {path}: {_short(exc)}"
        self._fsync.shutdown()
        self._hash.shutdown()
        self._fsync = self._hash = None

    @property
    def synced(self) -> bool:
        """Whether every file in `paths` was fsynced by this writer."""
        return self._hashing

    def makedirs(self, path, exist_ok=False):
        try:
            return self._inner.makedirs(path, exist_ok=exist_ok)
        except OSError as exc:
            self.error = self.error or f"creating {path}: {_short(exc)}"


@contextmanager
def _zip_crc32_off():
    """torch.save without its per-record zip CRC32: the sha256 taken of every byte on the way to the
    disk already covers the file, and the CRC cost ~0.02 s per 100 MB on the save's critical path.
    torch.load does not need it (torch.serialization.set_crc32_options); `unzip -t` would complain."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _describe_write_error(path, exc: BaseException) -> str:
    """One line for a failed write, with the free space left where it failed: torch's zip writer
    reports a full disk as an opaque RuntimeError ("unexpected pos ...") rather than ENOSPC."""
    text = f"writing {path}: {_short(exc)}"
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return text
    full = getattr(exc, "errno", None) == errno.ENOSPC or free < _FULL_BELOW
    return text + (f" (disk full: {free:,} bytes free)" if full else f" ({free:,} bytes free)")


def _deepspeed_save(ds_engine, tmp: Path, client_state: dict) -> _RecordingWriter:
    """DeepSpeed's own save into <tmp>/ds on this rank; returns the writer, which holds the files
    written, their digests when hashed on the way, and the error if any."""
    writer = _RecordingWriter(ds_engine.checkpoint_engine)

    def copy_failed(save_path, exc: OSError) -> None:
        writer.error = writer.error or _describe_write_error(save_path, exc)

    try:
        with writes_through(ds_engine, writer, copy_failed):
            ds_engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client_state, save_latest=False)
    finally:
        writer.wait_durable()
    return writer


def _write_gridtrain_files(tmp: Path, state: TrainState, ctx: SaveContext, rank: int) -> list[str]:
    """This rank's RNG state; on rank 0 also the run state JSON and the tokenizer copy."""
    writes = [(rng_file(rank), lambda target: torch.save(capture_rng_state(), target))]
    if rank == 0:
        record = {"train_state": state.to_dict(), "layout": ctx.layout, "config": ctx.config,
                  "versions": ctx.versions, "ds_tag": DS_TAG, "tokenizer": None}
        if ctx.tokenizer:
            record["tokenizer"] = TOKENIZER_NAME
            writes.append((TOKENIZER_NAME, lambda target: shutil.copyfile(ctx.tokenizer, target)))
        text = json.dumps(record, indent=2, sort_keys=True)
        writes.append((STATE_NAME, lambda target: target.write_text(text, encoding="utf-8")))
    for rel, write in writes:
        try:
            write(tmp / rel)
        except (OSError, RuntimeError) as exc:
            raise _WriteFailed(_describe_write_error(tmp / rel, exc)) from exc
    return [rel for rel, _ in writes]


class _WriteFailed(Exception):
    pass


def _write_rank_shard(ds_engine, tmp: Path, state: TrainState, ctx: SaveContext, rank: int, client_state: dict):
    """(manifest entries of this rank's files, error or None). Never raises for I/O errors."""
    writer = _deepspeed_save(ds_engine, tmp, client_state)
    if writer.error is not None:
        return {}, writer.error
    try:
        root = tmp.resolve()
        relative = {p: Path(p).resolve().relative_to(root).as_posix() for p in writer.paths}
        known = {relative[p]: digest for p, digest in writer.digests.items()}
        entries = digest_files(tmp, list(relative.values()), fsync=not writer.synced, known=known)
        own = _write_gridtrain_files(tmp, state, ctx, rank)
        return {**entries, **digest_files(tmp, own)}, None
    except _WriteFailed as exc:
        return {}, str(exc)
    except OSError as exc:  # fsync or read-back for the checksum
        return {}, f"fsync/checksum in {tmp}: {_short(exc)}"


def _prepare_temp(tmp: Path, rank: int) -> None:
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        except OSError as exc:
            error = f"creating {tmp}: {_short(exc)}"
    error = broadcast_object(error)
    if error is not None:
        raise CheckpointError(f"checkpoint save failed: {error}")


def _finish_on_rank0(tmp: Path, state: TrainState, ctx: SaveContext, entries: dict,
                     deleter: BackgroundDeleter) -> tuple[Path, int]:
    """Checksum files no rank claimed (DeepSpeed's recovery scripts), write the manifest last,
    publish, retire old checkpoints (deleted in the background)."""
    leftovers = [rel for rel in list_files(tmp) if rel not in entries]
    entries = {**entries, **digest_files(tmp, leftovers)}
    manifest = build_manifest(state.step, entries, ctx.layout, ctx.versions)
    write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    final = publish(tmp, ctx.ckpt_dir, state.step)
    deleter.delete(retire(ctx.ckpt_dir, ctx.keep_last, ctx.keep_every))
    return final, manifest["total_bytes"]


def save_checkpoint(ds_engine, state: TrainState, ctx: SaveContext, deleter: BackgroundDeleter,
                    client_state: dict | None = None) -> SaveResult:
    """Collective: every rank calls it at the same step. Raises CheckpointError on every rank if
    any rank failed; then nothing was published and the previous checkpoint is intact.
    `client_state` goes into DeepSpeed's model-states files (the universal checkpoint info).
    Retired checkpoints are deleted on `deleter`'s thread; the next save waits for them."""
    start = time.perf_counter()
    rank, _ = rank_and_world()
    if rank == 0:
        deleter.wait()  # the previous save's deletions (long done in training): their space may be needed now
    tmp = temp_path(ctx.ckpt_dir, state.step)
    _prepare_temp(tmp, rank)
    entries, error = _write_rank_shard(ds_engine, tmp, state, ctx, rank, client_state or {})
    gathered = all_gather_object((error, entries))
    failures = [f"rank {r}: {err}" for r, (err, _) in enumerate(gathered) if err is not None]
    outcome = None
    if rank == 0:
        if not failures:
            merged = {rel: entry for _, part in gathered for rel, entry in part.items()}
            try:
                outcome = _finish_on_rank0(tmp, state, ctx, merged, deleter)
            except OSError as exc:
                failures.append(f"rank 0: publishing: {_short(exc)}")
        if failures:
            shutil.rmtree(tmp, ignore_errors=True)
    failures, outcome = broadcast_object((failures, outcome))
    if failures:
        previous = read_latest(ctx.ckpt_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"checkpoint save at step {state.step} into {ctx.ckpt_dir} failed ({'; '.join(failures[:3])}); "
            f"nothing was published and {kept}; free space there or set checkpoint.dir elsewhere")
    final, total = outcome
    return SaveResult(path=Path(final), step=state.step, bytes=total, seconds=time.perf_counter() - start)


def note(message: str) -> None:
    """A rank-0 line on stderr in the CLI's style."""
    if rank_and_world()[0] == 0:
        print(f"[gridtrain] {message}", file=sys.stderr, flush=True)
