"""A checkpoint's manifest: every file with its size and checksum, the parallel layout and the
library versions; durable file writes; verification. No torch import, so `gridtrain checkpoint
inspect` stays fast.

sha256 is the checksum: measured here at ~1.9 GB/s per core (SHA extensions), several times this
disk's ~0.33 GB/s fdatasync write speed, and the ranks hash their own files in parallel. crc32
(~6.6 GB/s) would be faster but misses deliberate or structured corruption that sha256 does not."""
import hashlib
import json
import os
from pathlib import Path

from gridtrain.model.config import ModelConfig

MANIFEST_NAME = "manifest.json"
STATE_NAME = "gridtrain_state.json"
FORMAT = "gridtrain-checkpoint/1"
CHECKSUM = "sha256"
_CHUNK = 8 * 2**20
# Blocks smaller than this are hashed inline: handing them to a thread costs more than it saves.
_OFFLOAD_MIN = 2**20


def saved_model(ckpt: Path):
    """The ModelConfig of the run that wrote checkpoint `ckpt` (from its state file)."""
    config = json.loads((Path(ckpt) / STATE_NAME).read_text(encoding="utf-8"))["config"]
    return ModelConfig(**config["model"])


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of one file, read in chunks so memory stays flat."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class HashingWriter:
    """A write-only stream over an open binary file that feeds every byte to sha256 on its way to
    the file, so a shard's checksum costs no second read of it. With a `pool` (one thread), a large
    block is hashed there while this thread copies it into the file: both release the GIL, so
    hashing mostly hides behind the write. It has no `fileno`, on purpose: torch.save would then
    write storages straight to the descriptor, past the hash."""

    def __init__(self, raw, pool=None):
        self._raw = raw
        self._pool = pool
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        nbytes = memoryview(data).nbytes
        if self._pool is None or nbytes < _OFFLOAD_MIN:
            written = self._raw.write(data)  # buffered files write all of `data` or raise
            self._digest.update(data)
        else:
            hashed = self._pool.submit(self._digest.update, data)
            try:
                written = self._raw.write(data)
            finally:
                hashed.result()  # the caller may free `data` once we return, even on error
        self.size += nbytes
        return written

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new names, renames) durable: without it a crash can lose a
    rename even though the file data reached the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`, fsync the folder: readers see the old or the new content,
    never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def digest_files(root: Path, relpaths: list[str], fsync: bool = True,
                 known: dict[str, tuple[int, str]] | None = None) -> dict[str, dict]:
    """Size and checksum of each file under `root`, fsyncing it first (a rank's own shard files).
    `known` maps a relpath to the (size, sha256) hashed while it was written: those files are not
    read back, only checked against their size on disk, which catches a write that went astray."""
    entries = {}
    for rel in relpaths:
        path = root / rel
        if fsync:
            fsync_file(path)
        if known and rel in known:
            size, digest = known[rel]
            if path.stat().st_size != size:
                raise OSError(f"{path}: {path.stat().st_size} bytes on disk, {size} written")
        else:
            size, digest = file_digest(path)
        entries[rel] = {"size": size, CHECKSUM: digest}
    return entries


def list_files(root: Path) -> list[str]:
    """Every regular file under `root` as a sorted POSIX relative path, the manifest excluded."""
    root = Path(root)
    found = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(rel for rel in found if rel != MANIFEST_NAME)


def build_manifest(step: int, files: dict[str, dict], layout: dict, versions: dict) -> dict:
    return {
        "format": FORMAT,
        "step": step,
        "checksum": CHECKSUM,
        "layout": layout,
        "versions": versions,
        "total_bytes": sum(entry["size"] for entry in files.values()),
        "files": dict(sorted(files.items())),
    }


def read_manifest(ckpt: Path) -> dict:
    """The manifest of a checkpoint folder; raises OSError / ValueError if missing or unreadable."""
    manifest = json.loads((Path(ckpt) / MANIFEST_NAME).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{MANIFEST_NAME} is not a {FORMAT} manifest")
    shapes = {"step": int, "layout": dict, "versions": dict, "total_bytes": int, "files": dict}
    broken = [key for key, kind in shapes.items() if not isinstance(manifest.get(key), kind)]
    if broken or not all(isinstance(e, dict) and isinstance(e.get("size"), int) for e in manifest["files"].values()):
        raise ValueError(f"{MANIFEST_NAME} is incomplete ({', '.join(broken) or 'files'} missing or malformed)")
    return manifest


def verify_files(ckpt: Path, files: dict[str, dict], checksums: bool = True) -> list[str]:
    """Problems with the given manifest entries, each naming the file: missing, wrong size
    (truncated), checksum mismatch. Empty list: all good."""
    problems = []
    for rel, entry in files.items():
        path = Path(ckpt) / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != entry["size"]:
            problems.append(f"{path}: size {size} bytes, manifest says {entry['size']} (truncated or overwritten)")
        elif checksums and file_digest(path)[1] != entry[CHECKSUM]:
            problems.append(f"{path}: {CHECKSUM} mismatch (corrupted)")
    return problems


def verify_checkpoint(ckpt: Path, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems of a checkpoint folder (manifest unreadable, or file problems). `share` = (index,
    count) checks only every count-th file starting at index, so ranks split the reading."""
    try:
        manifest = read_manifest(ckpt)
    except (OSError, ValueError) as exc:
        return [f"{Path(ckpt) / MANIFEST_NAME}: unreadable ({exc})"]
    index, count = share
    names = sorted(manifest["files"])[index::count]
    return verify_files(ckpt, {name: manifest["files"][name] for name in names}, checksums)
