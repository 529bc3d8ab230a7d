"""Input discovery and chunking for preprocessing.

The main process only reads raw bytes and cuts them at record boundaries into chunks of about
CHUNK_BYTES; decoding UTF-8, parsing JSON and encoding happen in the workers. Chunk boundaries
depend only on the input, never on the worker count, which is what makes the output
byte-identical for any --workers."""
import glob
import gzip
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

from gridtrain.errors import UserError

CHUNK_BYTES = 1 << 20
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".txt", ".txt.gz")


@dataclass(frozen=True)
class Chunk:
    """Raw records of one input file. kind: "jsonl" (one JSON object per line), "blocks" (text
    documents separated by blank lines) or "file" (the whole file is one document)."""

    kind: str
    path: str
    first_line: int  # 1-based line number of the chunk's first byte, for bad-input reports
    data: bytes


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths, globs or folders (searched recursively for SUFFIXES), sorted and
    without duplicates, so every node of a `--part i/n` job sees the same list."""
    files, missing = set(), []
    for pattern in patterns:
        matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
        found = False
        for match in matches:
            if os.path.isdir(match):
                for root, _, names in os.walk(match):
                    for name in names:
                        if name.endswith(SUFFIXES):
                            files.add(os.path.join(root, name))
                            found = True
            elif os.path.isfile(match):
                files.add(match)
                found = True
        if not found:
            missing.append(pattern)
    if missing:
        raise UserError(f"--input {' '.join(missing)}: matched no file; give .jsonl, .jsonl.gz "
                        "or .txt files, globs or folders holding them")
    return sorted(files)


def parse_part(part: str) -> tuple[int, int]:
    """(i, n) of --part i/n, or one line saying how to write it."""
    try:
        index, count = (int(x) for x in part.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise UserError(f"--part={part!r}: write i/n with 0 <= i < n, e.g. 0/4") from None
    return index, count


def select_part(files: list[str], part: str) -> list[str]:
    """--part i/n: the i-th (0-based) of n contiguous slices of the sorted file list."""
    index, count = parse_part(part)
    return files[len(files) * index // count: len(files) * (index + 1) // count]


def file_kind(path: str, txt_mode: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    return "file" if txt_mode == "file" else "blocks"


def open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_chunks(path: str, txt_mode: str) -> Iterator[Chunk]:
    """Chunks of one file, cut after a newline (jsonl) or a blank line (blocks)."""
    try:
        yield from _read_chunks(path, file_kind(path, txt_mode))
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"--input {path}: unreadable ({exc}); fix or remove the file") from exc


def _read_chunks(path: str, kind: str) -> Iterator[Chunk]:
    with open_binary(path) as stream:
        if kind == "file":
            yield Chunk(kind, path, 1, stream.read())
            return
        separator = b"\n" if kind == "jsonl" else b"\n\n"
        line, rest = 1, b""
        while True:
            block = stream.read(CHUNK_BYTES)
            if not block:
                break
            data = rest + block
            cut = data.rfind(separator)
            if cut < 0:
                rest = data
                continue
            cut += len(separator)
            yield Chunk(kind, path, line, data[:cut])
            line += data.count(b"\n", 0, cut)
            rest = data[cut:]
        if rest:
            yield Chunk(kind, path, line, rest)


def all_chunks(files: list[str], txt_mode: str) -> Iterator[Chunk]:
    for path in files:
        yield from read_chunks(path, txt_mode)
