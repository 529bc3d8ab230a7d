"""Where a conversion writes: into a temporary name next to --out, renamed into place only when
complete, so a failure (or a kill) never leaves an output that looks finished; an existing
non-empty --out is refused unless --force, and then replaced only once the new one is complete."""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from gridtrain.errors import UserError
from gridtrain.train.checkpoint.manifest import fsync_dir


def check_target(out: Path, force: bool) -> None:
    out = Path(out)
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not force:
        raise UserError(f"--out {out}: already exists and is not empty; choose a new path or pass --force to replace it")


def _partial(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


@contextmanager
def temporary_folder(out: Path, force: bool):
    """A fresh temporary folder beside `out`, removed on the way out unless published."""
    out = Path(out)
    check_target(out, force)
    tmp = _partial(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def temporary_file(out: Path, force: bool):
    """A temporary file path beside `out`, removed on the way out unless published."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(out)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def publish_folder(tmp: Path, out: Path, force: bool) -> Path:
    """Rename the finished `tmp` to `out`; an existing `out` (allowed by --force) is moved aside
    first and deleted once the new one is in place."""
    out = Path(out)
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(aside)
    tmp.rename(out)
    fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
    return out


def publish_file(tmp: Path, out: Path) -> Path:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    fsync_dir(Path(out).parent)
    return Path(out)
