"""The checkpoint folder of a run: published checkpoints `step_00000100/`, temporary folders of
saves in progress `.tmp-step_00000100/`, and the `latest` pointer. Publishing is a rename on the same
filesystem, so a reader sees a checkpoint completely or not at all. No torch import.

    <checkpoint.dir>/
      latest                    text: name of the newest published checkpoint (atomic replace)
      step_00000100/
        manifest.json           written last: files + sizes + sha256, layout, versions
        gridtrain_state.json    TrainState, config, layout
        rng/rank_00000.pt       per-rank RNG states
        tokenizer.model         copy of the run's tokenizer (if any): a SentencePiece model, or
        tokenizer/              a Hugging Face tokenizer's files (tokenizer.json, tokenizer_config.json, ...)
        ds/...                  DeepSpeed's own files (mp_rank_*, zero_pp_rank_*, layer_*)
"""
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gridtrain.errors import UserError
from gridtrain.train.checkpoint.config import CheckpointConfig
from gridtrain.train.checkpoint.manifest import fsync_dir, verify_checkpoint, write_text_atomic

LATEST_NAME = "latest"
_NAME_RE = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp-"


class CheckpointError(UserError):
    """No usable checkpoint, or a save that could not complete."""


def _warn(message: str) -> None:
    print(f"[gridtrain] warning: {message}", file=sys.stderr, flush=True)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    match = _NAME_RE.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints as (step, path), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(step_of(p.name), p) for p in ckpt_dir.iterdir() if p.is_dir()]
    return sorted((step, path) for step, path in found if step is not None)


def checkpoint_folder_problem(path: Path) -> str | None:
    """None if `path` is a folder of checkpoints (what `checkpoint reshard --out` writes), else why
    not: for gridtrain.outputs' --force rule."""
    if not path.is_dir():
        return "a file, not a folder"
    if not list_checkpoints(path):
        return "no step_XXXXXXXX checkpoint in it"
    other = [p.name for p in path.iterdir()
             if p.name != LATEST_NAME and not p.name.startswith(".") and step_of(p.name) is None]
    return f"it holds {other[0]!r}, which a checkpoint folder does not" if other else None


def read_latest(ckpt_dir: Path) -> str | None:
    try:
        name = (Path(ckpt_dir) / LATEST_NAME).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if step_of(name) is not None else None


def checkpoint_dir(cfg: CheckpointConfig, run_dir: str) -> Path:
    """checkpoint.dir, else <run_dir>/checkpoints."""
    return Path(cfg.dir or Path(run_dir) / "checkpoints")


def temp_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{TMP_PREFIX}{checkpoint_name(step)}"


def remove_stale_temps(ckpt_dir: Path) -> list[Path]:
    """Delete temporary folders of saves that never published (a crash or a full disk mid-save)."""
    ckpt_dir = Path(ckpt_dir)
    stale = [p for p in ckpt_dir.glob(f"{TMP_PREFIX}*") if p.is_dir()] if ckpt_dir.is_dir() else []
    for path in stale:
        delete_folder(path)
    return stale


def publish(tmp: Path, ckpt_dir: Path, step: int) -> Path:
    """Rename a finished temp folder (manifest already inside) to its final name, then move the
    `latest` pointer. A published checkpoint of the same step (a rerun after --no-resume with
    overwrite) is replaced: it is moved aside first, then deleted once the new one is in place."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    fsync_dir(tmp)
    replaced = None
    if final.exists():
        replaced = ckpt_dir / f"{TMP_PREFIX}replaced-{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    tmp.rename(final)
    fsync_dir(ckpt_dir)
    write_text_atomic(ckpt_dir / LATEST_NAME, final.name + "\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def retention_victims(steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """Steps to delete: all but the newest `keep_last` (0 keeps all), except multiples of
    `keep_every` (kept permanently)."""
    if keep_last <= 0:
        return []
    recent = set(sorted(steps)[-keep_last:])
    return [s for s in sorted(steps) if s not in recent and not (keep_every > 0 and s % keep_every == 0)]


def retire(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Take old checkpoints out of the published set per the retention rule: each victim is renamed
    to a temp name (one rename, so a crash never leaves a half-deleted checkpoint that looks
    published, and the next resume's `remove_stale_temps` finishes the job). Returns the renamed
    folders, to be deleted by the caller."""
    by_step = dict(list_checkpoints(ckpt_dir))
    doomed = []
    for step in retention_victims(list(by_step), keep_last, keep_every):
        doomed.append(Path(ckpt_dir) / f"{TMP_PREFIX}deleting-{by_step[step].name}")
        by_step[step].rename(doomed[-1])
    return doomed


class BackgroundDeleter:
    """Deletes retired checkpoints on one thread, off the training path, as torchtitan's purge
    thread does: unlinking a few hundred MB of shards took ~0.07 s here, a fifth of a save's stall,
    and training has no need to wait for it. `wait()` returns once every deletion asked for is done;
    a save waits before it starts, so a small disk gets the space back before it is needed again.
    A deletion that fails (a file held open on a network filesystem, say) is reported once, as a
    warning naming the folder left behind; it never stops training."""

    def __init__(self):
        self._pool = None
        self._pending = []

    def delete(self, paths: list[Path]) -> None:
        if not paths:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gridtrain-ckpt-delete")
        self._pending += [self._pool.submit(delete_folder, path) for path in paths]

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()


def delete_folder(path: Path) -> bool:
    """Remove a retired checkpoint folder; on failure warn once (naming the folder and the first
    error) and return False."""
    failures = []

    def failed(function, name, error) -> None:
        failures.append((name, error[1] if isinstance(error, tuple) else error))

    shutil.rmtree(path, **({"onexc": failed} if sys.version_info >= (3, 12) else {"onerror": failed}))
    if not failures:
        return True
    name, error = failures[0]
    more = f" and {len(failures) - 1} more" if len(failures) > 1 else ""
    _warn(f"could not delete the retired checkpoint {path} ({name}: "
          f"{getattr(error, 'strerror', None) or error}{more}); remove it by hand")
    return False


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints to try on resume, newest first. The `latest` pointer is not trusted for this: a
    crash between the rename and the pointer update leaves it one behind, and a newer folder is
    complete anyway because publishing is a rename. The pointer serves tools and humans."""
    return [path for _, path in reversed(list_checkpoints(ckpt_dir))]


def choose_valid(paths: list[Path], verify=None) -> tuple[Path | None, list[str]]:
    """The first checkpoint of `paths` that verifies, with one warning per rejected checkpoint
    naming the bad file(s). `verify(path) -> problems` defaults to a full checksum check."""
    verify = verify or verify_checkpoint
    rejected = []
    for path in paths:
        problems = verify(path)
        if not problems:
            return path, rejected
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        rejected.append(f"checkpoint {path} is invalid: {problems[0]}{more}; falling back to an older one")
    return None, rejected


RESUME_FIX = "restore the files, pick one with --resume-from PATH, or start fresh with --no-resume"


def find_resumable(ckpt_dir: Path, verify=None, what: str | None = None, listed=candidates,
                   warn=_warn, fix: str = RESUME_FIX) -> Path | None:
    """The newest valid checkpoint in `ckpt_dir`, warning for each invalid one skipped. None if the
    folder holds no checkpoint at all; CheckpointError if it holds some but none is valid.
    `listed(ckpt_dir)` gives the checkpoints to try, newest first; `what` names the setting in
    the error (default: checkpoint.dir) and `fix` what to do about it."""
    paths = listed(ckpt_dir)
    if not paths:
        return None
    chosen, rejected = choose_valid(paths, verify)
    if chosen is None:
        what = what or f"checkpoint.dir={str(ckpt_dir)!r}"
        raise CheckpointError(
            f"{what}: none of its {len(paths)} checkpoints is valid (" + " | ".join(rejected)
            + f"); {fix}")
    for message in rejected:  # fell back to an older one: say which were skipped, and why
        warn(message)
    return chosen
