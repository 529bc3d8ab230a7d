"""The preprocessing worker: raw chunk bytes -> token ids per document (BOS where the tokenizer
adds one, the text, EOD; for fine-tuning formats a record rendered by
gridtrain.data.finetune_records, with its loss mask), with bad records counted. Runs in pool processes; the tokenizer
(gridtrain.data.tokenizer, any kind) is loaded once per process and encodes a chunk's documents in
one batch."""
import json
import os
import re
import signal
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from gridtrain.data.finetune_records import BadRecord, encode_records, parse_record
from gridtrain.data.readers import Chunk
from gridtrain.data.tokenizer import load_tokenizer

# Bad-record locations kept per reason for the report; counts are always complete.
KEEP_LOCATIONS = 5
BLANK_LINES = re.compile(rb"(\n(?:[ \t\r\f\v]*\n)+)")
# A chunk may be cut inside a run of blank lines; the rest of that run is not part of a document.
LEADING_BLANK_LINES = re.compile(rb"^(?:[ \t\r\f\v]*\n)+")


@dataclass
class EncodedChunk:
    tokens: np.ndarray  # all documents' ids, each followed by EOD, in the shard dtype
    lengths: np.ndarray  # int64 [documents], each including its EOD
    records: int  # documents kept + records skipped
    input_bytes: int
    bad: dict = field(default_factory=dict)  # reason -> [count, ["path:line", ...]]
    masks: np.ndarray | None = None  # uint8 aligned with tokens (fine-tuning formats): 1 = in the loss


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer: str  # path, as gridtrain.data.tokenizer.load_tokenizer takes it
    json_key: str
    dtype: str  # numpy dtype name of the shard tokens
    format: str = "text"  # gridtrain.data.finetune_records.FORMATS
    keys: tuple = ()  # fine-tuning formats: ((name, JSON field), ...) for prompt, completion, messages
    max_tokens: int | None = None  # fine-tuning formats: longer records are skipped and counted


_tokenizer = None
_failed: Exception | None = None


def init_worker(tokenizer_path: str) -> None:
    """Load the tokenizer once per worker. A failure is kept and raised by the first task: an
    initializer that raises makes multiprocessing.Pool start a new worker, forever."""
    global _tokenizer, _failed
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    # A forked worker inherits its parent's handlers; one that only records SIGTERM (a rank's
    # catch_early, run earlier in the same process) would make Pool.terminate() wait forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        _tokenizer = load_tokenizer(tokenizer_path)
    except Exception as exc:  # noqa: BLE001 - handed to the task, which reports it
        _failed = exc


def note_bad(bad: dict, reason: str, chunk: Chunk, line: int) -> None:
    entry = bad.setdefault(reason, [0, []])
    entry[0] += 1
    if len(entry[1]) < KEEP_LOCATIONS:
        entry[1].append(f"{chunk.path}:{line}")


def valid_utf8(text: str) -> bool:
    """JSON \\u escapes can produce lone surrogates, which are not encodable text."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_jsonl(chunk: Chunk, key: str, bad: dict) -> tuple[list[str], int]:
    texts, records = [], 0
    for offset, raw in enumerate(chunk.data.split(b"\n")):
        if not raw.strip():
            continue
        records += 1
        line = chunk.first_line + offset
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError:
            note_bad(bad, "non-utf8", chunk, line)
            continue
        except ValueError:
            note_bad(bad, "invalid-json", chunk, line)
            continue
        text = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            note_bad(bad, "missing-key", chunk, line)
        elif not text.strip():
            note_bad(bad, "empty", chunk, line)
        elif b"\\u" in raw and not valid_utf8(text):
            note_bad(bad, "non-utf8", chunk, line)
        else:
            texts.append(text)
    return texts, records


def parse_text(chunk: Chunk, bad: dict) -> tuple[list[str], int]:
    """"file": the chunk is one document; "blocks": documents separated by blank lines."""
    if chunk.kind == "file":
        pieces = [chunk.data]
    else:
        pieces = BLANK_LINES.split(chunk.data)
    texts, records, line = [], 0, chunk.first_line
    for i, raw in enumerate(pieces):
        start = line
        line += raw.count(b"\n")
        if chunk.kind == "blocks":
            if i % 2 == 1 or not raw.strip():
                continue  # a separator, or blank space around one
            stripped = LEADING_BLANK_LINES.sub(b"", raw)
            start += raw.count(b"\n") - stripped.count(b"\n")
            raw = stripped
        records += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            note_bad(bad, "non-utf8", chunk, start)
            continue
        if not text.strip():
            note_bad(bad, "empty", chunk, start)
        else:
            texts.append(text)
    return texts, records


def encode_finetune_chunk(chunk: Chunk, settings: EncodeSettings) -> EncodedChunk:
    """A chunk of fine-tuning records (JSONL): ids and loss mask per record, encoded as a batch."""
    bad, parsed, lines, records, keys = {}, [], [], 0, dict(settings.keys)
    for offset, raw in enumerate(chunk.data.split(b"\n")):
        if not raw.strip():
            continue
        records += 1
        try:
            parsed.append(parse_record(raw, settings.format, keys))
            lines.append(chunk.first_line + offset)
        except BadRecord as exc:
            note_bad(bad, str(exc), chunk, chunk.first_line + offset)
    docs, masks = [], []
    for line, result in zip(lines, encode_records(parsed, settings.format, _tokenizer)):
        if not isinstance(result, BadRecord) and settings.max_tokens is not None and len(result[0]) > settings.max_tokens:
            result = BadRecord("too-long")
        if isinstance(result, BadRecord):
            note_bad(bad, str(result), chunk, line)
            continue
        docs.append(result[0])
        masks.append(result[1])
    lengths = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
    tokens = np.fromiter(chain.from_iterable(docs), dtype=settings.dtype, count=int(lengths.sum()))
    mask = np.concatenate([np.asarray(m, dtype=np.uint8) for m in masks]) if masks else np.zeros(0, np.uint8)
    return EncodedChunk(tokens, lengths, records, len(chunk.data), bad, mask)


def encode_chunk(chunk: Chunk, settings: EncodeSettings) -> EncodedChunk:
    if _failed is not None:
        raise _failed
    if settings.format != "text":
        return encode_finetune_chunk(chunk, settings)
    bad = {}
    if chunk.kind == "jsonl":
        texts, records = parse_jsonl(chunk, settings.json_key, bad)
    else:
        texts, records = parse_text(chunk, bad)
    # One thread per worker (TOKENIZERS_PARALLELISM=false for HF tokenizers, num_threads=1 for
    # SentencePiece): parallelism comes from the worker processes.
    docs = _tokenizer.documents(texts)
    lengths = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
    tokens = np.fromiter(chain.from_iterable(docs), dtype=settings.dtype, count=int(lengths.sum()))
    return EncodedChunk(tokens, lengths, records, len(chunk.data), bad)
