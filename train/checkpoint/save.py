"""The save protocol: every rank writes its shard into one temporary folder, fsyncs and checksums
its own files; rank 0 adds the manifest last, renames the folder into place, moves `latest` and
applies retention. Any rank's failure (a full disk, say) is agreed on by all ranks, the temporary
folder is removed and the previous checkpoint stays untouched.

DeepSpeed writes its files through its own `save_checkpoint` (model states per TP/PP rank,
`zero_pp_rank_*` optimizer partitions per DP rank, `layer_*` files for pipelines) into
`<tmp>/ds/`. Its writes go through `engine.checkpoint_engine.save`; we wrap that object for the
duration of the save to learn which files this rank wrote and to catch a failed write without
leaving DeepSpeed's collectives (its trailing barrier) unmatched on the other ranks.

A save has two collective halves, one mechanism for both modes: `start_save` (DeepSpeed's
save_checkpoint, whose file writes our writer takes over, and the small gridtrain files) and
`finish_save` (wait until this rank's files are durable, agree on errors, manifest, publish). A
synchronous save runs them back to back, writing each file inline. An asynchronous one copies each
state dict DeepSpeed hands over to host memory (the only stall) and writes it on a thread while
training goes on; `finish_save` runs at a later step. DeepSpeed 0.19.8's own asynchronous engines do
not fit (evidence in parallel/deepspeed_compat.py's `is_torch_checkpoint_engine`)."""
import copy as copy_module
import errno
import json
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from gridtrain.parallel.collectives import all_gather_object, broadcast_object, rank_and_world
from gridtrain.parallel.deepspeed_compat import is_torch_checkpoint_engine, torch_save_options, writes_through
from gridtrain.train.checkpoint.manifest import (
    STATE_NAME,
    HashingWriter,
    build_manifest,
    digest_files,
    fsync_file,
    list_files,
    write_text_atomic,
)
from gridtrain.train.checkpoint.rng import capture_rng_state
from gridtrain.train.checkpoint.state import TrainState
from gridtrain.train.checkpoint.store import BackgroundDeleter, CheckpointError, publish, read_latest, retire, temp_path

DS_TAG = "ds"
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
    tokenizer_files: tuple = ()  # (name in the checkpoint, source path) of the run's tokenizer
    keep_last: int = 0
    keep_every: int = 0


@dataclass(frozen=True)
class SaveResult:
    path: Path
    step: int
    bytes: int
    seconds: float  # from the start of the save until it was published
    stall: float  # of those, the seconds training waited (all of them for a synchronous save)
    published_at: float = 0.0  # time.time() of the publication

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


class HostStaging:
    """Host memory for background saves, kept from one save to the next: the buffers of a save
    are free again once it is published, and there is never more than one in flight. Fresh
    buffers cost five times the copy itself (first-touch page faults: 0.09 s vs 0.018 s for
    200 MB, measured here); the price is one more copy of this rank's shard held in host memory.
    Copies from a GPU go to pinned memory."""

    def __init__(self):
        self._buffers: dict[tuple, torch.UntypedStorage] = {}

    def copy(self, storage: torch.UntypedStorage, key: tuple) -> torch.UntypedStorage:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.nbytes() != storage.nbytes():
            pinned = storage.device.type == "cuda"
            buffer = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            self._buffers[key] = buffer
        buffer.copy_(storage)
        return buffer


class _RecordingWriter:
    """Stands in for DeepSpeed's checkpoint engine during one save: delegates every call, remembers
    the paths written and turns a failed write into a recorded error so DeepSpeed's control flow
    (and its collectives) continues on this rank.

    With DeepSpeed's plain torch engine it writes the file itself, as that engine would
    (torch.save, same serialization), but hashes the bytes as they are written and fsyncs each
    finished file on a thread while the next one is serialized: a save then never reads its
    shards back, and the disk flush overlaps the CPU work instead of following it. With
    `staging`, `save` only copies the state dict to host memory and the write runs on a thread."""

    def __init__(self, inner, staging: HostStaging | None = None):
        self._inner = inner
        self.paths: list[str] = []
        self.digests: dict[str, tuple[int, str]] = {}
        self.error: str | None = None
        self._hashing = is_torch_checkpoint_engine(inner)
        self._fsync = ThreadPoolExecutor(max_workers=1) if self._hashing else None
        self._hash = ThreadPoolExecutor(max_workers=1) if self._hashing else None
        self._staging = staging
        self._writes = ThreadPoolExecutor(max_workers=1) if self._hashing and staging is not None else None
        self._pending = []  # (path, future) of fsyncs and background writes, in order

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def save(self, state_dict, path):
        if self.error is not None:
            return None
        if not self._hashing:
            try:
                result = self._inner.save(state_dict, path)
            except (OSError, RuntimeError) as exc:
                self.error = _describe_write_error(path, exc)
                return None
        elif self._writes is not None:
            snapshot = host_copy(state_dict, self._staging, Path(path).name)
            self._pending.append((path, self._writes.submit(self._write, snapshot, path)))
            result = None
        else:
            self._write(state_dict, path)
            result = None
        self.paths.append(str(path))
        return result

    def _write(self, state_dict, path) -> None:
        """torch.save into `path`, hashed on the way; the fsync is queued. Errors are recorded."""
        if self.error is not None:
            return
        try:
            with open(path, "wb") as raw:
                sink = _FlushingSink(raw, self._hash, self._fsync)
                try:
                    with _zip_crc32_off():
                        torch.save(state_dict, sink, **torch_save_options(self._inner))
                finally:
                    sink.settle()
        except (OSError, RuntimeError) as exc:  # torch's zip writer reports ENOSPC as RuntimeError
            self.error = self.error or _describe_write_error(path, exc)
            return
        self.digests[str(path)] = (sink.size, sink.hexdigest())
        self._pending.append((path, self._fsync.submit(fsync_file, path)))

    def later(self, fn, *args) -> Future:
        """fn(*args) after the files queued so far: on the writer thread in the background, else
        now. `fn` must report its errors in its result (`done` and `wait_durable` cover it)."""
        if self._writes is not None:
            future = self._writes.submit(fn, *args)
            self._pending.append(("(gridtrain files)", future))
            return future
        future = Future()
        future.set_result(fn(*args))
        return future

    def done(self) -> bool:
        """Whether every write and fsync started so far has finished (never blocks)."""
        return all(future.done() for _, future in list(self._pending))

    def wait_durable(self) -> None:
        """Wait for the writes and fsyncs started by `save`; a failed one becomes this rank's error.
        Background writes queue their fsyncs as they finish, so the list grows while it is walked."""
        if self._fsync is None:
            return
        index = 0
        while index < len(self._pending):
            path, future = self._pending[index]
            try:
                future.result()
            except OSError as exc:
                self.error = self.error or f"fsync of {path}: {_short(exc)}"
            index += 1
        for pool in (self._writes, self._fsync, self._hash):
            if pool is not None:
                pool.shutdown()
        self._writes = self._fsync = self._hash = None

    @property
    def synced(self) -> bool:
        """Whether every file in `paths` was fsynced by this writer."""
        return self._hashing

    def makedirs(self, path, exist_ok=False):
        try:
            return self._inner.makedirs(path, exist_ok=exist_ok)
        except OSError as exc:
            self.error = self.error or f"creating {path}: {_short(exc)}"


def host_copy(obj, staging: HostStaging, name: str, storages: dict | None = None):
    """`obj` (the state dict of file `name`) with every tensor copied to host memory (`staging`'s
    buffers), so training may change the originals while the copy is written. Tensors sharing a
    storage share it in the copy too, and each storage is copied whole: torch.save writes exactly
    the same bytes for the copy as for the original. Anything else is deep-copied (DeepSpeed's
    dicts hold small objects, e.g. a loss scaler)."""
    storages = {} if storages is None else storages
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (storage.device, storage.data_ptr(), storage.nbytes())
        if key not in storages:
            storages[key] = staging.copy(storage, (name, len(storages)))
        copy = torch.empty(0, dtype=obj.dtype).set_(storages[key], obj.storage_offset(), obj.size(), obj.stride())
        return torch.nn.Parameter(copy, requires_grad=obj.requires_grad) if isinstance(obj, torch.nn.Parameter) else copy
    if isinstance(obj, dict):
        copy = obj.copy()  # keeps OrderedDict / defaultdict
        for key, value in obj.items():
            copy[key] = host_copy(value, staging, name, storages)
        return copy
    if isinstance(obj, (list, tuple, set)):
        items = [host_copy(item, staging, name, storages) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy_module.deepcopy(obj)


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


def _gridtrain_files(state: TrainState, ctx: SaveContext, rank: int) -> list[tuple[str, object]]:
    """(relative path, writer) of this rank's RNG state and, on rank 0, the run state JSON and the
    tokenizer copy. Their contents are taken now, so they may be written later."""
    rng = capture_rng_state()
    writes = [(rng_file(rank), lambda target: torch.save(rng, target))]
    if rank == 0:
        record = {"train_state": state.to_dict(), "layout": ctx.layout, "config": ctx.config,
                  "versions": ctx.versions, "ds_tag": DS_TAG, "tokenizer": None}
        if ctx.tokenizer_files:
            record["tokenizer"] = ctx.tokenizer_files[0][0].split("/")[0]  # tokenizer.model, or tokenizer/
            writes += [(rel, lambda target, source=source: _copy(source, target)) for rel, source in ctx.tokenizer_files]
        text = json.dumps(record, indent=2, sort_keys=True)
        writes.append((STATE_NAME, lambda target: target.write_text(text, encoding="utf-8")))
    return writes


def _copy(source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _write_gridtrain_files(tmp: Path, writes: list) -> tuple[dict, str | None]:
    """(manifest entries, error or None) of writing `writes` into `tmp`. Never raises for I/O errors."""
    for rel, write in writes:
        try:
            write(tmp / rel)
        except (OSError, RuntimeError) as exc:
            return {}, _describe_write_error(tmp / rel, exc)
    try:
        return digest_files(tmp, [rel for rel, _ in writes]), None
    except OSError as exc:
        return {}, f"checksum in {tmp}: {_short(exc)}"


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


def _finish_on_rank0(tmp: Path, step: int, ctx: SaveContext, entries: dict,
                     deleter: BackgroundDeleter) -> tuple[Path, int]:
    """Checksum files no rank claimed (DeepSpeed's recovery scripts), write the manifest last,
    publish, retire old checkpoints (deleted in the background)."""
    leftovers = [rel for rel in list_files(tmp) if rel not in entries]
    entries = {**entries, **digest_files(tmp, leftovers)}
    manifest = build_manifest(step, entries, ctx.layout, ctx.versions)
    write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    final = publish(tmp, ctx.ckpt_dir, step)
    deleter.delete(retire(ctx.ckpt_dir, ctx.keep_last, ctx.keep_every))
    return final, manifest["total_bytes"]


@dataclass
class PendingSave:
    """One rank's save between `start_save` and `finish_save`."""
    tmp: Path
    step: int
    writer: _RecordingWriter
    own: Future  # (manifest entries, error or None) of the gridtrain files this rank writes
    started: float  # time.perf_counter() at the start
    stall: float  # seconds training has waited for this save so far
    background: bool  # written on a thread (else inline: all of the save stalls training)

    def done(self) -> bool:
        """Whether this rank's files are all written and fsynced (never blocks)."""
        return self.writer.done()


def start_save(ds_engine, state: TrainState, ctx: SaveContext, deleter: BackgroundDeleter,
               client_state: dict | None = None, staging: HostStaging | None = None) -> PendingSave:
    """First half of a save, collective: DeepSpeed's save_checkpoint into <tmp>/ds (with
    `staging`, each file is copied to host memory and written on a thread) and this rank's
    gridtrain files. I/O errors are kept for `finish_save` to agree on, never raised here.
    `client_state` goes into DeepSpeed's model-states files (the universal checkpoint info)."""
    start = time.perf_counter()
    rank, _ = rank_and_world()
    if rank == 0:
        deleter.wait()  # the previous save's deletions (long done in training): their space may be needed now
    tmp = temp_path(ctx.ckpt_dir, state.step)
    _prepare_temp(tmp, rank)
    writer = _RecordingWriter(ds_engine.checkpoint_engine, staging)

    def copy_failed(save_path, exc: OSError) -> None:
        writer.error = writer.error or _describe_write_error(save_path, exc)

    try:
        with writes_through(ds_engine, writer, copy_failed):
            ds_engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client_state or {}, save_latest=False)
    except BaseException:
        writer.wait_durable()  # no thread keeps writing behind an exception
        raise
    own = writer.later(_write_gridtrain_files, tmp, _gridtrain_files(state, ctx, rank))
    return PendingSave(tmp, state.step, writer, own, start, time.perf_counter() - start, staging is not None)


def _rank_entries(pending: PendingSave) -> tuple[dict, str | None]:
    """(manifest entries of this rank's files, error or None), once they are durable."""
    writer = pending.writer
    writer.wait_durable()
    own, own_error = pending.own.result()
    error = writer.error or own_error
    if error is not None:
        return {}, error
    try:
        root = pending.tmp.resolve()
        relative = {p: Path(p).resolve().relative_to(root).as_posix() for p in writer.paths}
        known = {relative[p]: digest for p, digest in writer.digests.items()}
        entries = digest_files(pending.tmp, list(relative.values()), fsync=not writer.synced, known=known)
        return {**entries, **own}, None
    except OSError as exc:  # fsync or read-back for the checksum
        return {}, f"fsync/checksum in {pending.tmp}: {_short(exc)}"


def finish_save(pending: PendingSave, ctx: SaveContext, deleter: BackgroundDeleter) -> SaveResult:
    """Second half, collective: wait until this rank's files are durable, agree on every rank's
    outcome; rank 0 writes the manifest and publishes. Raises CheckpointError on every rank if any
    rank failed; then nothing was published and the previous checkpoint is intact. Retired
    checkpoints are deleted on `deleter`'s thread; the next save waits for them."""
    begin = time.perf_counter()
    rank, _ = rank_and_world()
    entries, error = _rank_entries(pending)
    gathered = all_gather_object((error, entries))
    failures = [f"rank {r}: {err}" for r, (err, _) in enumerate(gathered) if err is not None]
    outcome = None
    if rank == 0:
        if not failures:
            merged = {rel: entry for _, part in gathered for rel, entry in part.items()}
            try:
                outcome = _finish_on_rank0(pending.tmp, pending.step, ctx, merged, deleter)
            except OSError as exc:
                failures.append(f"rank 0: publishing: {_short(exc)}")
        if failures:
            shutil.rmtree(pending.tmp, ignore_errors=True)
    failures, outcome = broadcast_object((failures, outcome))
    if failures:
        previous = read_latest(ctx.ckpt_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"checkpoint save at step {pending.step} into {ctx.ckpt_dir} failed ({'; '.join(failures[:3])}); "
            f"nothing was published and {kept}; free space there or set checkpoint.dir elsewhere")
    final, total = outcome
    end = time.perf_counter()
    return SaveResult(path=Path(final), step=pending.step, bytes=total, seconds=end - pending.started,
                      stall=pending.stall + end - begin if pending.background else end - pending.started,
                      published_at=time.time())


def note(message: str) -> None:
    """A rank-0 line on stderr in the CLI's style."""
    if rank_and_world()[0] == 0:
        print(f"[gridtrain] {message}", file=sys.stderr, flush=True)
