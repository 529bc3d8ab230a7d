"""gridtrain.outputs: the rule every command that writes follows for its output path.

A command never replaces or deletes what it did not create in this call. An output path that holds
something is refused; `--force` lets a command replace only a previous output of the same kind
(an export by an export, shards by shards), recognised by its content, and never a source of the
call, a folder inside one or a folder holding one. Outputs are written aside and renamed into
place when complete (each command does that with its own files). Standard library only: every
layer may use it."""
import os
from pathlib import Path
from typing import Callable, Iterable

from gridtrain.errors import UserError

# What a kind's recogniser answers: None if `path` is a previous output of that kind, else why not.
Recogniser = Callable[[Path], "str | None"]


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def overlap(out, source) -> str | None:
    """How `out` overlaps `source` ("is", "is inside", "holds"), or None."""
    out, source = _resolved(out), _resolved(source)
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "holds"
    return None


def check_output(out, flag: str, force: bool, kind: str, recognise: Recogniser, sources: Iterable = ()) -> None:
    """Refuse `out` (given as `flag`) in one line when it overlaps a source, or holds something and
    `force` is off, or `force` is on but it is not a previous `kind` output (`recognise`)."""
    for source in sources:
        how = overlap(out, source)
        if how is not None:
            raise UserError(f"{flag} {out}: {how} {'the' if how == 'is' else 'a'} source of this command ({source}); "
                            "write the output somewhere else (--force never replaces a source)")
    path = Path(out)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    if not force:
        raise UserError(f"{flag} {out}: already exists and is not empty; choose a new path, or pass --force to "
                        f"replace it if it is a previous {kind}")
    why = recognise(path)
    if why is not None:
        raise UserError(f"{flag} {out}: --force replaces only a previous {kind}, and this is not one ({why}); "
                        "choose a new path")


def creatable(out, flag: str) -> None:
    """Refuse in one line an output whose folder cannot be created or written here (checked
    before any work, so a long run does not fail at its end)."""
    parent = _resolved(out).parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {out}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {existing} is not writable by this user; choose another path")
