"""`gridtrain tokenizer train`: a tokenizer from a bounded, evenly spread sample of the corpus.

- bpe / unigram: a SentencePiece model (tokenizer.model) with byte fallback (no id is ever unknown),
  bos/eos/pad and an end-of-document piece; normalization off and whitespace kept as is, so
  decode(encode(text)) == text, which code and other whitespace-sensitive text need.
- bytelevel: a byte-level BPE with GPT-2's pre-tokenizer, trained by the `tokenizers` library, as a
  Hugging Face folder (tokenizer.json, tokenizer_config.json): <|endoftext|> ends documents (eos,
  also bos and unk, as GPT-2 and SmolLM2 have it) and no BOS is added. transformers, llama.cpp
  (pre-tokenizer `gpt-2`) and gridtrain read it as they read GPT-2's.

tokenizer_info.json beside them records the kind, vocabulary size, special ids and the sample."""
import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Iterator

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gridtrain.data import readers
from gridtrain.data.encode import parse_jsonl, parse_text
from gridtrain.data.tokenizer import EOD_PIECE, load_tokenizer
from gridtrain.errors import UserError
from gridtrain.outputs import creatable

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


MODEL_TYPES = ("bpe", "unigram", "bytelevel")
INFO = "tokenizer_info.json"
# What each kind writes, the file users look for last (it appears once the others are in place).
OUTPUT_FILES = {"sentencepiece": ("tokenizer.vocab", INFO, "tokenizer.model"),
                "huggingface": (INFO, "tokenizer_config.json", "tokenizer.json")}
END_OF_TEXT = "<|endoftext|>"


def check_tokenizer_output(out_dir: str, force: bool) -> None:
    """--out may hold anything but the files training writes; those only with --force, and only a
    previous tokenizer (its shards would no longer match a new one)."""
    names = [files[-1] for files in OUTPUT_FILES.values()] + [n for files in OUTPUT_FILES.values() for n in files[:-1]]
    found = [os.path.join(out_dir, name) for name in dict.fromkeys(names) if os.path.lexists(os.path.join(out_dir, name))]
    if found and not force:
        raise UserError(f"--out {out_dir}: {found[0]} already exists (shards made with it would no longer match a "
                        "new one); choose a new folder, or pass --force to replace that tokenizer")
    if found:
        load_tokenizer(out_dir)  # a UserError unless the folder holds a tokenizer
    creatable(os.path.join(out_dir, INFO), "--out")


def _sentencepiece_fix(vocab_size: int, message: str) -> str:
    """The right change for SentencePiece's refusal: it needs more pieces than asked for (every
    character of the sample must fit) or fewer than the sample can make."""
    more = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if more:
        return f"the sample needs at least {more.group(1)} pieces for its characters: raise --vocab-size"
    fewer = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if fewer:
        return f"the sample supports at most {fewer.group(2)} pieces: lower --vocab-size or give more text"
    return "give more text, or change --vocab-size"


def train_tokenizer(inputs: list[str], vocab_size: int, out_dir: str, model_type: str = "bpe",
                    sample_bytes: int = 20_000_000, json_key: str = "text", txt_mode: str = "file",
                    threads: int = 2, force: bool = False) -> dict:
    """Train into a temporary folder, then move the tokenizer's files into out_dir (created if
    missing, and removed again if training fails); returns tokenizer_info.json's content with
    "model", the path to give `--tokenizer` / data.tokenizer."""
    if model_type not in MODEL_TYPES:
        raise UserError(f"--model-type={model_type!r}: use one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 300:
        raise UserError(f"--vocab-size={vocab_size}: use at least 300 (256 byte pieces + specials + merges)")
    check_tokenizer_output(out_dir, force)
    files = readers.expand_inputs(inputs)
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir)
    documents = sample_documents(files, sample_bytes, json_key, txt_mode)
    try:
        if model_type == "bytelevel":
            _train_bytelevel(documents, vocab_size, staging)
        else:
            _train_sentencepiece(documents, vocab_size, model_type, staging, threads)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only if empty: nothing else is ever removed
        if isinstance(exc, RuntimeError):
            raise UserError(f"--vocab-size={vocab_size}: SentencePiece could not train ({str(exc).strip()}); "
                            f"{_sentencepiece_fix(vocab_size, str(exc))}") from None
        raise
    kind = "huggingface" if model_type == "bytelevel" else "sentencepiece"
    info = describe(staging, kind, model_type, files, sample_bytes)
    with open(os.path.join(staging, INFO), "w") as f:
        json.dump(info, f, indent=2)
    for name in OUTPUT_FILES[kind]:
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)
    model = out_dir if kind == "huggingface" else os.path.join(out_dir, "tokenizer.model")
    return {**info, "model": model}


def _train_sentencepiece(documents: Iterator[str], vocab_size: int, model_type: str, staging: str, threads: int):
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(documents),
        model_prefix=os.path.join(staging, "tokenizer"), vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=[EOD_PIECE],
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=threads, minloglevel=2,
    )


def _train_bytelevel(documents: Iterator[str], vocab_size: int, staging: str) -> None:
    """GPT-2's recipe: ByteLevel pre-tokenizer (its regex), every byte in the initial alphabet,
    <|endoftext|> as the one special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[AddedToken(END_OF_TEXT, special=True, normalized=False)],
                                  show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    tok.save(os.path.join(staging, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT,
              "unk_token": END_OF_TEXT, "clean_up_tokenization_spaces": False}
    with open(os.path.join(staging, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def describe(folder: str, kind: str, model_type: str, files: list[str], sample_bytes: int) -> dict:
    tokenizer = load_tokenizer(folder)
    return {"kind": kind, "model_type": model_type, "vocab_size": tokenizer.vocab_size,
            "special_ids": tokenizer.special_ids, "input_files": len(files), "sample_bytes": sample_bytes}
