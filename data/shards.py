"""Writing Megatron-format shards (PREFIX.bin + PREFIX.idx) through megatron-core's own
IndexedDatasetBuilder, so megatron-core's IndexedDataset and Megatron-LM read them unchanged.

Shards are written under names that do not form a .bin/.idx pair (PREFIX.bin.partial,
PREFIX.idx.partial) and renamed only when the whole run succeeded, so an interrupted run never
leaves a pair that looks complete."""
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from gridtrain.errors import UserError
from gridtrain.outputs import creatable

PARTIAL = ".partial"
# The first bytes of every .idx megatron-core's IndexedDatasetBuilder writes (indexed_dataset.py,
# _INDEX_HEADER in 0.16.1): how `preprocess --force` knows a previous output from anything else.
INDEX_MAGIC = b"MMIDIDX\x00\x00"


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (megatron-core's GPTDatasetConfig uses the same rule)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


# A fine-tuning shard's loss mask (uint8, 1 = in the loss) is a Megatron shard of its own beside the
# tokens, aligned document for document: PREFIX.bin/.idx and PREFIX_loss_mask.bin/.idx.
LOSS_MASK_SUFFIX = "_loss_mask"


def shard_prefix(output_prefix: str, part: Optional[str], shard: Optional[int], suffix: str = "") -> str:
    prefix = output_prefix
    if part:
        index, count = part.split("/")
        prefix += f"_part{int(index):03d}of{int(count):03d}"
    if shard is not None:
        prefix += f"_{shard:05d}"
    return prefix + suffix


def existing_outputs(output_prefix: str, part: Optional[str]) -> list[Path]:
    """The files a preprocess run of this prefix (and part) would write that already exist: the
    shard pair, numbered shard pairs (--shard-size-tokens) and the summary."""
    base = Path(shard_prefix(output_prefix, part, None))
    found = [base.with_name(base.name + suffix) for suffix in (".bin", ".idx", ".summary.json")]
    found += [base.with_name(base.name + LOSS_MASK_SUFFIX + suffix) for suffix in (".bin", ".idx")]
    if base.parent.is_dir():
        found += base.parent.glob(base.name + "_[0-9][0-9][0-9][0-9][0-9].*")
        found += base.parent.glob(base.name + "_[0-9][0-9][0-9][0-9][0-9]" + LOSS_MASK_SUFFIX + ".*")
    return sorted(p for p in found if p.exists() and p.suffix in (".bin", ".idx", ".json"))


def check_shard_output(output_prefix: str, part: Optional[str], force: bool) -> list[Path]:
    """Refuse (one line) an --output-prefix whose files exist, unless `force` and every one is a
    previous preprocess output (shards with megatron's index header, their summary); returns the
    files the run will replace. Checked before any encoding, with the folder's writability."""
    existing = existing_outputs(output_prefix, part)
    flag = f"--output-prefix {output_prefix}"
    if existing and not force:
        raise UserError(f"{flag}: {existing[0]} already exists; choose a new prefix, or pass --force to replace "
                        "that previous output")
    for path in existing:
        if path.suffix == ".idx" and path.read_bytes()[:len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise UserError(f"{flag}: {path} is not a shard index megatron-core wrote; --force replaces only "
                            "previous shards: choose a new prefix")
        if path.suffix == ".bin" and not path.with_suffix(".idx").exists():
            raise UserError(f"{flag}: {path} has no .idx beside it, so it is not a previous shard; choose a new prefix")
    creatable(shard_prefix(output_prefix, part, None) + ".bin", "--output-prefix")
    return existing


def import_builder() -> None:
    """Import megatron-core's IndexedDatasetBuilder without running megatron/core/__init__.py.

    Why: that __init__ imports the training stack (tensor_parallel, distributed, optimizer,
    transformer, torch._inductor; wandb when installed): ~3.6 CPU-s beyond torch's own 1.5 on this
    machine, a quarter of a whole `preprocess` of a 33 MB corpus on 2 cores, none of it used for
    writing shards. The builder module itself is imported normally (it imports torch, numpy and
    megatron.core.utils). The package is registered uninitialised and completes its own __init__ the
    first time anything asks it for a missing attribute (`from megatron.core import X`, PEP 562), so
    later users in the same process see the whole package. If this megatron-core version cannot be
    imported that way, the package is imported whole instead (slower, same result). Evidence and
    figures: bench/bench_data_preprocess.py."""
    if "megatron.core" in sys.modules:
        importlib.import_module("megatron.core.datasets.indexed_dataset")
        return
    spec = importlib.util.find_spec("megatron.core")
    package = importlib.util.module_from_spec(spec)

    def missing(name: str):
        # `from megatron.core import config` asks for a submodule (hasattr first): import just it.
        if importlib.util.find_spec(f"megatron.core.{name}") is not None:
            return importlib.import_module(f"megatron.core.{name}")
        del package.__getattr__  # anything else is defined by __init__: run it now, once
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = missing
    sys.modules["megatron.core"] = package
    sys.modules["megatron"].core = package  # what `import megatron.core` binds
    try:
        # megatron.core.utils and parallel_state import each other; parallel_state first is the order
        # the package's own __init__ resolves it in.
        importlib.import_module("megatron.core.parallel_state")
        importlib.import_module("megatron.core.datasets.indexed_dataset")
    except ImportError:
        for name in [n for n in sys.modules if n == "megatron.core" or n.startswith("megatron.core.")]:
            del sys.modules[name]
        importlib.import_module("megatron.core.datasets.indexed_dataset")


class ShardWriter:
    """Appends documents to the current shard; starts a new shard after one reaches
    shard_size_tokens (documents are never split). finish() publishes all shards atomically."""

    def __init__(self, output_prefix: str, dtype: type, shard_size_tokens: Optional[int],
                 part: Optional[str] = None, suffix: str = ""):
        self.output_prefix = output_prefix
        self.suffix = suffix  # after the shard number: LOSS_MASK_SUFFIX for the masks
        self.dtype = dtype
        self.shard_size_tokens = shard_size_tokens
        self.part = part
        self.done: list[tuple[str, int, int]] = []  # (prefix, documents, tokens) of closed shards
        self.builder = None
        self.prefix = None
        self.documents = 0
        self.tokens = 0

    def _open(self) -> None:
        import_builder()
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        shard = len(self.done) if self.shard_size_tokens else None
        self.prefix = shard_prefix(self.output_prefix, self.part, shard, self.suffix)
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        self.builder = IndexedDatasetBuilder(self.prefix + ".bin" + PARTIAL, dtype=self.dtype)
        self.documents = self.tokens = 0

    def _close(self) -> None:
        self.builder.finalize(self.prefix + ".idx" + PARTIAL)
        self.done.append((self.prefix, self.documents, self.tokens))
        self.builder = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: the documents' ids back to back; lengths: each document's token count."""
        start = 0
        for length in lengths.tolist():
            if self.builder is None:
                self._open()
            self.builder.add_document(tokens[start:start + length], [length])
            start += length
            self.documents += 1
            self.tokens += length
            if self.shard_size_tokens and self.tokens >= self.shard_size_tokens:
                self._close()

    def finish(self) -> list[tuple[str, int, int]]:
        """Close the last shard and rename every shard to its final name (.bin first, .idx last:
        a reader checks for both)."""
        if self.builder is not None and self.documents:
            self._close()
        elif self.builder is not None:
            self.abort_current()
        for prefix, _, _ in self.done:
            os.replace(prefix + ".bin" + PARTIAL, prefix + ".bin")
        for prefix, _, _ in self.done:
            os.replace(prefix + ".idx" + PARTIAL, prefix + ".idx")
        return list(self.done)

    def abort_current(self) -> None:
        self.builder.data_file.close()
        os.remove(self.prefix + ".bin" + PARTIAL)
        self.builder = None

    def abort(self) -> None:
        """Remove every partial file of this run."""
        if self.builder is not None:
            self.abort_current()
        for prefix, _, _ in self.done:
            for suffix in (".bin", ".idx"):
                if os.path.exists(prefix + suffix + PARTIAL):
                    os.remove(prefix + suffix + PARTIAL)
        self.done = []
