"""Where a conversion writes: into a temporary name next to --out, renamed into place only when
complete, so a failure (or a kill) never leaves an output that looks finished. Which --out a
conversion may write to, and what --force may replace there (a previous output of the same kind,
never a source), is gridtrain.outputs' rule, with the kinds recognised here."""
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

from gridtrain.errors import UserError
from gridtrain.outputs import check_output
from gridtrain.train.checkpoint.manifest import fsync_dir

# What an HF model folder gridtrain exports (or transformers saves) holds: files only.
_HF_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens"
                       r"|model\.safetensors\.index|chat_template)\.(json|jinja)|tokenizer\.model"
                       r"|model(-\d{5}-of-\d{5})?\.safetensors|README\.md|\.gitattributes")


def hf_folder_problem(path: Path) -> str | None:
    """None if `path` is a Hugging Face model folder (what `--to hf` writes), else why not."""
    if not path.is_dir():
        return "a file, not a folder"
    names = sorted(p.name for p in path.iterdir())
    if "config.json" not in names:
        return "no config.json in it"
    other = [name for name in names if not (path / name).is_file() or not _HF_FILES.fullmatch(name)]
    return f"it holds {other[0]!r}, which a model folder does not" if other else None


def gguf_problem(path: Path) -> str | None:
    if not path.is_file():
        return "a folder, not a file"
    with open(path, "rb") as fh:
        return None if fh.read(4) == b"GGUF" else "no GGUF header"


def config_problem(path: Path) -> str | None:
    """None if `path` is a YAML run config (what `--to gridtrain` writes), else why not."""
    if not path.is_file():
        return "a folder, not a file"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "not a readable YAML file"
    return None if isinstance(data, dict) and "model" in data else "not a run config with a model section"


KINDS = {"hf": ("Hugging Face model folder", hf_folder_problem), "gguf": ("GGUF file", gguf_problem),
         "gridtrain": ("gridtrain config file", config_problem)}


def check_export(out, to: str, force: bool, sources=()) -> None:
    """Whether `--to TO --out OUT` may be written (see gridtrain.outputs); one line otherwise. A file
    output (gguf, gridtrain) is never an existing folder, empty or not."""
    kind, recognise = KINDS[to]
    if to != "hf" and Path(out).is_dir():
        raise UserError(f"--out {out}: is a folder; --to {to} writes one file: give its path, e.g. {Path(out) / 'model.gguf'}"
                        if to == "gguf" else f"--out {out}: is a folder; --to {to} writes one YAML file: give its path")
    check_output(out, "--out", force, kind, recognise, sources)


def parse_size(text: str) -> int:
    """"5GB", "500MB", "2GiB", "1024" (bytes) -> bytes, as transformers' max_shard_size reads them."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[:-len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise UserError(f"--max-shard-size={text!r}: give a size like 5GB, 500MB or 2GiB")


def _partial(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


@contextmanager
def temporary_folder(out: Path):
    """A fresh temporary folder beside `out`, removed on the way out unless published."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def temporary_file(out: Path):
    """A temporary file path beside `out`, removed on the way out unless published."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(out)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def publish_folder(tmp: Path, out: Path) -> Path:
    """Rename the finished `tmp` to `out`; an existing `out` (allowed by check_export) is moved
    aside first and deleted once the new one is in place."""
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
