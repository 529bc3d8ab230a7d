"""`gridtrain preprocess`: text -> Megatron-format token shards, streaming.

The main process reads raw chunks and writes shards; a pool of workers decodes, parses and
encodes chunks. Results come back in input order, so the output is byte-identical for any
--workers. At most a few chunks per worker are in flight (Pool.imap would read the whole input
ahead into its task queue), so memory stays bounded whatever the input size."""
import contextlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, TextIO

import numpy as np

from gridtrain.data import encode, readers
from gridtrain.data.finetune_records import FORMATS
from gridtrain.data.shards import (
    LOSS_MASK_SUFFIX,
    ShardWriter,
    check_shard_output,
    import_builder,
    shard_prefix,
    token_dtype,
)
from gridtrain.data.tokenizer import load_tokenizer
from gridtrain.errors import UserError

IN_FLIGHT_PER_WORKER = 4
# Input queued for the workers before the writer's slow import runs in this process (~4 s of
# encoding on 2 cores at ~8 MB/s; bounded, so a large corpus does not sit in memory).
AHEAD_BYTES = 64 * 2**20


@dataclass(frozen=True)
class PreprocessOptions:
    inputs: tuple
    tokenizer: str
    output_prefix: str
    json_key: str = "text"
    workers: int = 1
    shard_size_tokens: Optional[int] = None
    part: Optional[str] = None
    txt_mode: str = "file"  # "file": one document per file; "blocks": blank-line separated
    max_bad_fraction: float = 0.01
    force: bool = False  # replace a previous output of this prefix (shards and summary only)
    format: str = "text"  # text | completion | chat (gridtrain.data.finetune_records)
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    max_tokens: Optional[int] = None  # completion/chat: skip (and count) longer records


# Empty (or whitespace-only) documents are skipped and counted, not errors: a corpus of source files
# has empty files (1.6% of a Python stdlib corpus), and Megatron-LM's tool skips them too.
EMPTY = "empty"


@dataclass
class Totals:
    documents: int = 0
    tokens: int = 0
    records: int = 0
    input_bytes: int = 0
    bad: dict = field(default_factory=dict)  # malformed records: reason -> [count, locations]
    empty: list = field(default_factory=lambda: [0, []])  # [count, locations] of empty documents

    loss_tokens: int = 0  # fine-tuning formats: tokens in the loss

    def add(self, result: encode.EncodedChunk) -> None:
        self.documents += len(result.lengths)
        self.tokens += int(result.lengths.sum())
        if result.masks is not None:
            self.loss_tokens += int(result.masks.sum())
        self.records += result.records
        self.input_bytes += result.input_bytes
        for reason, (count, where) in result.bad.items():
            entry = self.empty if reason == EMPTY else self.bad.setdefault(reason, [0, []])
            entry[0] += count
            entry[1].extend(where[: encode.KEEP_LOCATIONS - len(entry[1])])

    @property
    def skipped(self) -> int:
        return sum(count for count, _ in self.bad.values())


class Progress:
    """A redrawn bar on a terminal, a plain line every `interval` seconds otherwise."""

    def __init__(self, total_bytes: int, stream: TextIO, interval: float = 10.0):
        self.total_bytes = total_bytes
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self.start = self.last = time.perf_counter()

    def update(self, totals: Totals, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        done = min(totals.input_bytes / self.total_bytes, 1.0) if self.total_bytes else 1.0
        rates = (f"{totals.input_bytes / 1e6 / elapsed:6.1f} MB/s {totals.tokens / elapsed / 1e3:8.1f}k tok/s "
                 f"{totals.documents} docs {totals.empty[0]} empty {totals.skipped} bad")
        if self.tty:
            bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
            self.stream.write(f"\r[{bar}] {100 * done:5.1f}% {rates}" + ("\n" if final else ""))
        else:
            self.stream.write(f"preprocess: {100 * done:5.1f}% {rates}\n")
        self.stream.flush()


@contextlib.contextmanager
def encoding_pool(settings: encode.EncodeSettings, workers: int):
    """The worker processes; even one worker is a process of its own, so the writer's import
    (see import_writer) runs beside it. Forked from this process (cheap) when it runs no other
    thread; else started by a fork server: a fork copies the locks other threads hold, and a worker
    then waits on one forever (seen: preprocess called inside a pytest-xdist worker hung)."""
    if threading.active_count() == 1:
        context = multiprocessing.get_context("fork")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["gridtrain.data.encode"])
    with context.Pool(workers, initializer=encode.init_worker, initargs=(settings.tokenizer,)) as pool:
        yield pool


def ordered_results(chunks: Iterable, settings: encode.EncodeSettings, pool, workers: int, meanwhile=None) -> Iterator:
    """Encoded chunks in input order. `meanwhile()` runs in this process once up to AHEAD_BYTES of
    input are queued for the workers, so they encode while it runs."""
    pending, queued = deque(), 0
    for chunk in chunks:
        pending.append(pool.apply_async(encode.encode_chunk, (chunk, settings)))
        queued += len(chunk.data)
        if meanwhile is not None:
            if queued < AHEAD_BYTES:
                continue
            meanwhile()
            meanwhile = None
        if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
            yield pending.popleft().get()
    if meanwhile is not None:
        meanwhile()
    while pending:
        yield pending.popleft().get()


def import_writer() -> None:
    """megatron-core's dataset writer costs ~2.3 CPU-s to import (torch, and megatron.core.utils;
    see shards.import_builder): done while the workers encode the first AHEAD_BYTES instead of
    before they start."""
    import_builder()


def preprocess(opts: PreprocessOptions, stream: TextIO = sys.stderr) -> dict:
    """Run one preprocessing job; returns the summary (also written as PREFIX.summary.json)."""
    check_options(opts)
    replaced = check_shard_output(opts.output_prefix, opts.part, opts.force)
    try:
        tokenizer = load_tokenizer(opts.tokenizer)  # a missing or broken one, or one without an eod
    except UserError as exc:
        raise UserError(f"--{exc}") from None
    files = readers.expand_inputs(list(opts.inputs))
    if opts.part:
        files = readers.select_part(files, opts.part)
    check_format(opts, tokenizer, files)
    dtype = token_dtype(tokenizer.vocab_size)
    keys = (("prompt", opts.prompt_key), ("completion", opts.completion_key), ("messages", opts.messages_key))
    settings = encode.EncodeSettings(os.path.abspath(opts.tokenizer), opts.json_key, dtype.__name__, opts.format,
                                     keys, opts.max_tokens)
    writer = ShardWriter(opts.output_prefix, dtype, opts.shard_size_tokens, opts.part)
    # Fine-tuning: the masks in shards of their own, cut at the same documents as the tokens.
    masks = ShardWriter(opts.output_prefix, np.uint8, opts.shard_size_tokens, opts.part, LOSS_MASK_SUFFIX) \
        if opts.format != "text" else None
    totals, started = Totals(), time.perf_counter()
    progress = Progress(sum(os.path.getsize(f) for f in files), stream)
    try:
        with encoding_pool(settings, opts.workers) as pool:
            chunks = readers.all_chunks(files, opts.txt_mode)
            for result in ordered_results(chunks, settings, pool, opts.workers, meanwhile=import_writer):
                writer.add(result.tokens, result.lengths)
                if masks is not None:
                    masks.add(result.masks, result.lengths)
                totals.add(result)
                progress.update(totals)
        progress.update(totals, final=True)
        check_bad_fraction(totals, opts.max_bad_fraction)
        # The masks first: a token shard is what a reader looks for, and it appears last.
        mask_shards = masks.finish() if masks is not None else []
        shards = writer.finish()
    except BaseException:
        writer.abort()
        if masks is not None:
            masks.abort()
        raise
    summary = build_summary(opts, files, totals, shards, dtype, time.perf_counter() - started)
    write_summary(summary, shard_prefix(opts.output_prefix, opts.part, None) + ".summary.json")
    remove_outdated(replaced, shards + mask_shards)
    return summary


def remove_outdated(replaced: list, shards: list) -> None:
    """Previous shards of the prefix this run did not write again (it wrote fewer numbered shards),
    which would otherwise look like part of the new output: --force asked to replace them."""
    written = {prefix + suffix for prefix, _, _ in shards for suffix in (".bin", ".idx")}
    for path in replaced:
        if path.suffix in (".bin", ".idx") and str(path) not in written:
            path.unlink(missing_ok=True)


def check_format(opts: PreprocessOptions, tokenizer, files: list) -> None:
    """A fine-tuning format needs JSONL input and, with a Hugging Face tokenizer, a chat template."""
    if opts.format == "text":
        return
    not_jsonl = [f for f in files if readers.file_kind(f, opts.txt_mode) != "jsonl"]
    if not_jsonl:
        raise UserError(f"--format {opts.format}: {not_jsonl[0]} is not a .jsonl[.gz] file; fine-tuning records "
                        "are JSON objects, one per line")
    if opts.format == "chat" and tokenizer.kind == "huggingface" and tokenizer.chat_template is None:
        raise UserError(f"--format chat: the tokenizer {opts.tokenizer} has no chat template (chat_template.jinja "
                        "or chat_template in tokenizer_config.json); add the model's template there, or use a "
                        "tokenizer that ships one")


def check_options(opts: PreprocessOptions) -> None:
    problems = []
    if opts.format not in FORMATS:
        problems.append(f"--format={opts.format}: use one of {', '.join(FORMATS)}")
    if opts.max_tokens is not None and (opts.max_tokens < 1 or opts.format == "text"):
        problems.append(f"--max-tokens={opts.max_tokens}: use a positive token count, with --format completion or chat")
    if opts.workers < 1:
        problems.append(f"--workers={opts.workers}: use 1 or more")
    if opts.shard_size_tokens is not None and opts.shard_size_tokens < 1:
        problems.append(f"--shard-size-tokens={opts.shard_size_tokens}: use a positive token count")
    if not 0 <= opts.max_bad_fraction <= 1:
        problems.append(f"--max-bad-fraction={opts.max_bad_fraction}: use a fraction in [0, 1]")
    if opts.txt_mode not in ("file", "blocks"):
        problems.append(f"--txt-mode={opts.txt_mode!r}: use file or blocks")
    if opts.part is not None:
        readers.parse_part(opts.part)
    if problems:
        raise UserError("; ".join(problems))


def bad_report(totals: Totals) -> str:
    return "; ".join(f"{reason}: {count} (first at {', '.join(where)})"
                     for reason, (count, where) in sorted(totals.bad.items()))


def check_bad_fraction(totals: Totals, max_bad_fraction: float) -> None:
    if totals.documents == 0:
        raise UserError(f"--input: no usable document in {totals.records} records"
                        + (f" ({bad_report(totals)})" if totals.bad else "")
                        + (f" ({totals.empty[0]} empty)" if totals.empty[0] else "")
                        + "; check --json-key and the input format")
    fraction = totals.skipped / max(totals.records, 1)
    if fraction > max_bad_fraction:
        raise UserError(
            f"--max-bad-fraction={max_bad_fraction}: {totals.skipped} of {totals.records} records "
            f"({100 * fraction:.2f}%) are bad: {bad_report(totals)}; fix the input or raise the limit"
        )


def build_summary(opts, files, totals: Totals, shards, dtype, seconds: float) -> dict:
    output_bytes = sum(os.path.getsize(p + ".bin") + os.path.getsize(p + ".idx") for p, _, _ in shards)
    return {
        "format": opts.format,
        "documents": totals.documents, "tokens": totals.tokens, "records": totals.records,
        "input_bytes": totals.input_bytes, "output_bytes": output_bytes,
        "skipped": totals.skipped,
        "bad": {reason: {"count": count, "first": where} for reason, (count, where) in sorted(totals.bad.items())},
        "empty_documents": {"count": totals.empty[0], "first": totals.empty[1]},
        "seconds": round(seconds, 3),
        "tokens_per_second": round(totals.tokens / max(seconds, 1e-9), 1),
        "mb_per_second": round(totals.input_bytes / 1e6 / max(seconds, 1e-9), 3),
        "workers": opts.workers, "tokenizer": os.path.abspath(opts.tokenizer), "dtype": dtype.__name__,
        "input_files": len(files), "part": opts.part,
        "shards": [{"prefix": p, "documents": d, "tokens": t} for p, d, t in shards],
        **({"loss_tokens": totals.loss_tokens, "loss_mask_suffix": LOSS_MASK_SUFFIX} if opts.format != "text" else {}),
        # Ready for data.blend: each shard weighted by its tokens, i.e. sampled in proportion.
        "blend": [[t, os.path.abspath(p)] for p, _, t in shards],
    }


def write_summary(summary: dict, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
