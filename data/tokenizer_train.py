"""`gridtrain tokenizer train`: a SentencePiece model from a bounded, evenly spread sample of the
corpus, with byte fallback (no id is ever unknown) and bos/eos/pad plus an end-of-document piece.

Normalization is off and whitespace is kept as is, so decode(encode(text)) == text, which code
and other whitespace-sensitive text need."""
import json
import os
import shutil
import tempfile
from typing import Iterator

import sentencepiece as spm

from gridtrain.data import readers
from gridtrain.data.encode import parse_jsonl, parse_text
from gridtrain.data.spm_model import EOD_PIECE, load_processor, special_ids
from gridtrain.errors import UserError

# SentencePiece skips training sentences longer than this many bytes; we feed lines.
MAX_SENTENCE_BYTES = 4192


def sample_documents(files: list[str], sample_bytes: int, json_key: str, txt_mode: str) -> Iterator[str]:
    """About sample_bytes of documents, spread evenly over the inputs: keep a chunk whenever the
    running input position crosses the next multiple of total/sample_bytes stride."""
    total = sum(os.path.getsize(f) for f in files)
    keep_fraction = min(1.0, sample_bytes / max(total, 1))
    seen = kept = 0.0
    for chunk in readers.all_chunks(files, txt_mode):
        seen += len(chunk.data)
        if kept > seen * keep_fraction:
            continue
        kept += len(chunk.data)
        texts, _ = parse_jsonl(chunk, json_key, {}) if chunk.kind == "jsonl" else parse_text(chunk, {})
        yield from texts


def sentences(documents: Iterator[str]) -> Iterator[str]:
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip() and len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                yield line


def train_tokenizer(inputs: list[str], vocab_size: int, out_dir: str, model_type: str = "bpe",
                    sample_bytes: int = 20_000_000, json_key: str = "text", txt_mode: str = "file",
                    threads: int = 2) -> dict:
    """Train into a temporary folder, then move tokenizer.model/.vocab/.json into out_dir."""
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"--model-type={model_type!r}: use bpe or unigram")
    if vocab_size < 300:
        raise UserError(f"--vocab-size={vocab_size}: use at least 300 (256 byte pieces + specials + merges)")
    files = readers.expand_inputs(inputs)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(sample_documents(files, sample_bytes, json_key, txt_mode)),
            model_prefix=os.path.join(staging, "tokenizer"), vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=[EOD_PIECE],
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=threads, minloglevel=2,
        )
    except RuntimeError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"--vocab-size={vocab_size}: SentencePiece could not train ({exc}); "
                        "give more text or a smaller vocabulary") from exc
    info = describe(os.path.join(staging, "tokenizer.model"), model_type, files, sample_bytes)
    with open(os.path.join(staging, "tokenizer.json"), "w") as f:
        json.dump(info, f, indent=2)
    for name in ("tokenizer.vocab", "tokenizer.json", "tokenizer.model"):  # .model last: it is what users look for
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)
    return {**info, "model": os.path.join(out_dir, "tokenizer.model")}


def describe(model_path: str, model_type: str, files: list[str], sample_bytes: int) -> dict:
    processor = load_processor(model_path)
    return {
        "model": "tokenizer.model", "model_type": model_type, "vocab_size": processor.GetPieceSize(),
        "special_ids": special_ids(processor), "eod_piece": EOD_PIECE, "byte_fallback": True,
        "input_files": len(files), "sample_bytes": sample_bytes,
    }
