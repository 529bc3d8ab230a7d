"""Tokenizers: the one place that decides what a tokenizer path is, and one interface over the kinds
gridtrain accepts. Nothing else looks at file names or suffixes of tokenizers.

A tokenizer is named by
- a SentencePiece `.model` file (what `gridtrain tokenizer train` writes by default; Llama 2,
  Mistral v0.1-0.3);
- a Hugging Face `tokenizer.json`, or a folder holding one (with tokenizer_config.json and
  special_tokens_map.json beside it): Llama 3, Qwen, SmolLM2, GPT-2, Mistral Nemo, the folder
  `convert --to hf` writes, the folder `tokenizer train --model-type bytelevel` writes. A folder with
  both files is read as transformers reads it (tokenizer.json); one with only tokenizer.model as
  SentencePiece.

Every kind answers: encode / encode_batch (ids of text, no special tokens), documents (ids of
whole documents for shards: BOS when the tokenizer's configuration adds one, then the text, then
the end-of-document id), decode, stream (incremental decoding), vocab_size, eod/bos/eos/pad ids,
stop_ids (ids that end a generated turn), chat_template, files (what a checkpoint keeps).

Special-token strings inside text (a literal "<|endoftext|>" in a web page) are split like any text,
never matched as the special token: a document cannot fake a document boundary, as with
SentencePiece, which never produces control ids from text. (Megatron-LM's HuggingFaceTokenizer
matches them; chat rendering, which inserts them on purpose, is the exception and matches them.)

Why the `tokenizers` library directly rather than megatron-core's tokenizer library
(megatron.core.tokenizers): its huggingface class wraps transformers' AutoTokenizer and encodes
one document per Python call, while `tokenizers.Tokenizer.encode_batch_fast` encodes a worker's
whole chunk in Rust; measured in bench/bench_data_preprocess.py. Parity with transformers'
AutoTokenizer (same ids, same BOS rule, same special ids) is tested in tests/data/test_tokenizer.py.

Lazy import: transformers (the optional `hf` extra; about 2.5 s, torch with it) only when a Hugging
Face tokenizer is loaded, so a dry run and the SentencePiece path never pay for it.
"""
import json
import os
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders

from gridtrain.errors import UserError

EOD_PIECE = "<eod>"  # the control piece `gridtrain tokenizer train` reserves for document ends
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Tokens that end an assistant turn in the chat formats of published models, besides eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
               "<|end_of_text|>")


def tokenizer_kind(path) -> str | None:
    """"huggingface", "sentencepiece" or None (nothing there), from the path alone."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return "huggingface"
        return "sentencepiece" if (path / "tokenizer.model").is_file() else None
    if not path.is_file():
        return None
    return "huggingface" if path.name.endswith(".json") else "sentencepiece"


def find_tokenizer(folder) -> str | None:
    """The tokenizer a model folder or checkpoint carries (its tokenizer/ subfolder, or the folder
    itself), or None."""
    for place in (Path(folder) / "tokenizer", Path(folder)):
        if place.is_dir() and tokenizer_kind(place):
            return str(place) if tokenizer_kind(place) == "huggingface" else str(place / "tokenizer.model")
    return None


def load_tokenizer(path):
    """The tokenizer at `path` (see the module docstring); one-line UserError for anything else."""
    kind = tokenizer_kind(path)
    if kind is None:
        what = "no tokenizer there" if Path(path).exists() else "no such file or folder"
        raise UserError(f"tokenizer={str(path)!r}: {what}; give a SentencePiece .model, a tokenizer.json, "
                        "or a Hugging Face folder holding tokenizer.json (e.g. the model's folder)")
    if kind == "huggingface":
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(Path(path) / "tokenizer.model" if Path(path).is_dir() else path)


class StreamDecoder:
    """Text of generated ids as they come: `step(id)` returns the new text ("" while a multi-byte
    character is still incomplete), so a character split across tokens is printed once, whole;
    `finish()` returns what is still held back (bytes that never became a character, shown as
    U+FFFD as decode shows them)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""
        self._rust = decoders.DecodeStream(skip_special_tokens=False) if tokenizer.kind == "huggingface" else None

    def step(self, token_id: int) -> str:
        if self._rust is not None:
            return self._rust.step(self.tokenizer.backend, token_id) or ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # byte-fallback pieces may complete the character with the next token
        return self._new(text)

    def finish(self) -> str:
        if self._rust is not None:
            return ""
        return self._new(self.tokenizer.decode(self.ids))

    def _new(self, text: str) -> str:
        new, self.shown = text[len(self.shown):], text
        return new


class _Ids:
    """What both kinds answer the same way from their `_ids` (name -> id, -1 when absent)."""

    _ids: dict

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    @property
    def special_ids(self) -> dict:
        """bos/eos/pad/unk/eod ids; -1 where the tokenizer has no such token."""
        return dict(self._ids)

    bos = property(lambda self: self._ids["bos"])
    eos = property(lambda self: self._ids["eos"])
    eod = property(lambda self: self._ids["eod"])
    pad = property(lambda self: self._ids["pad"] if self._ids["pad"] not in (self.eos, self.eod) else -1)


class SentencePieceTokenizer(_Ids):
    """A SentencePiece model. Documents carry no BOS (gridtrain's shards never had one); the end of
    a document is the model's <eod> control piece, or eos for an external model (Megatron-LM's
    GPTSentencePieceTokenizer convention)."""

    kind = "sentencepiece"

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise UserError(f"tokenizer={self.path!r}: no such file; give the .model written by `gridtrain tokenizer "
                            "train` or an existing SentencePiece model")
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(self.path)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"tokenizer={self.path!r}: not a SentencePiece model ({exc})") from None
        eod = self.processor.PieceToId(EOD_PIECE)
        if eod == self.processor.unk_id() or self.processor.IdToPiece(eod) != EOD_PIECE:
            eod = self.processor.eos_id()
        self._ids = {"bos": self.processor.bos_id(), "eos": self.processor.eos_id(), "pad": self.processor.pad_id(),
                     "unk": self.processor.unk_id(), "eod": eod}
        if eod < 0:
            raise UserError(f"tokenizer={self.path!r}: the model has neither an {EOD_PIECE} nor an eos piece; "
                            "documents could not be separated in the shards")

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return self.processor.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, out_type=int, num_threads=1) if texts else []

    def documents(self, texts: list[str]) -> list[list[int]]:
        return [ids + [self.eod] for ids in self.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.processor.DecodeIds([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self.processor.IdToPiece(token_id)

    @property
    def stop_ids(self) -> set[int]:
        return {i for i in (self.eos, self.eod) if i >= 0}

    chat_template = None

    def files(self) -> list[tuple[str, str]]:
        """(name in a checkpoint, path) of the files that make this tokenizer."""
        return [("tokenizer.model", self.path)]

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core's datasets hash into their index-cache names (its legacy tokenizer
        base class records the class and the path)."""
        return {"class": type(self).__name__, "tokenizer_path": [os.path.abspath(self.path)]}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _or_minus(value) -> int:
    return value if isinstance(value, int) else -1


def _parse(json_path: Path) -> RustTokenizer:
    try:
        return RustTokenizer.from_file(str(json_path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises Exception for a corrupt file
        raise UserError(f"tokenizer={str(json_path)!r}: not a Hugging Face tokenizer.json ({str(exc).strip()}); "
                        "restore the file, or give the model's folder") from None


def _auto_tokenizer(path: Path, json_path: Path):
    """transformers' tokenizer for `path` (a folder, or a tokenizer file of any name)."""
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError:
        raise UserError(f"tokenizer={str(path)!r}: reading a Hugging Face tokenizer needs transformers: "
                        "pip install 'gridtrain[hf]'") from None
    try:
        if path.is_dir() or json_path.name == "tokenizer.json":
            return AutoTokenizer.from_pretrained(json_path.parent)
        return PreTrainedTokenizerFast(tokenizer_file=str(json_path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"tokenizer={str(path)!r}: transformers cannot load it ({str(exc).strip()[:300]}); restore "
                        "the tokenizer files") from None


def tokenizer_vocab_size(path) -> int:
    """The vocabulary size of the tokenizer at `path` without loading transformers or torch (for
    a dry run); a UserError as load_tokenizer's for a missing or broken one. For a Hugging Face
    tokenizer it counts tokenizer.json's tokens: transformers may add a special token its
    configuration names on top, which the ranks check again with the tokenizer itself."""
    kind = tokenizer_kind(path)
    if kind != "huggingface":
        return load_tokenizer(path).vocab_size
    json_path = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    return _parse(json_path).get_vocab_size(with_added_tokens=True)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"tokenizer: {path} is not readable JSON ({exc}); restore the tokenizer files") from None
    if not isinstance(data, dict):
        raise UserError(f"tokenizer: {path} holds a JSON {type(data).__name__}, not an object; restore the file")
    return data


class HuggingFaceTokenizer(_Ids):
    """A Hugging Face tokenizer, built by transformers' AutoTokenizer exactly as transformers builds
    it for that folder (the tokenizer class named in tokenizer_config.json may set its own
    normalizer or pre-tokenizer, and decides whether add_bos_token is honoured: reproducing that
    per class by hand would drift). gridtrain then encodes with a copy of that pipeline through the
    `tokenizers` library, in batches, with special-token strings split (module docstring).
    transformers (the `hf` extra) is imported here only: a dry run reads tokenizer_vocab_size."""

    kind = "huggingface"

    def __init__(self, path):
        path = Path(path)
        self.folder = path if path.is_dir() else path.parent
        self.path = str(path)
        json_path = path / "tokenizer.json" if path.is_dir() else path
        self.json_path = json_path
        _parse(json_path)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (self.folder / name).is_file():
                _read_json(self.folder / name)
        self.hf = _auto_tokenizer(path, json_path)
        self.config = getattr(self.hf, "init_kwargs", {}) or {}
        # A copy: transformers' own calls (apply_chat_template) reset the live pipeline's flags.
        self.backend = RustTokenizer.from_str(self.hf.backend_tokenizer.to_str())
        self.backend.encode_special_tokens = True  # special-token strings in text stay text (module docstring)
        self._ids = {name: _or_minus(getattr(self.hf, f"{name}_token_id", None)) for name in ("bos", "eos", "pad", "unk")}
        self._ids["eod"] = self._ids["eos"] if self._ids["eos"] >= 0 else self._dedicated_end()
        if self._ids["eod"] < 0:
            raise UserError(f"tokenizer={self.path!r}: has neither an eos_token (tokenizer_config.json) nor an "
                            "end-of-text token; documents could not be separated in the shards: set eos_token")

    def _dedicated_end(self) -> int:
        for text in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"):
            found = self.backend.token_to_id(text)
            if found is not None:
                return found
        return -1

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)] if texts else []

    def documents(self, texts: list[str]) -> list[list[int]]:
        """Each text as transformers' `tokenizer(text).input_ids` (BOS where configured), then eod
        unless the post-processor already ended it with that id."""
        encoded = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=True)] if texts else []
        return [ids if ids and ids[-1] == self.eod else ids + [self.eod] for ids in encoded]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id)

    @property
    def stop_ids(self) -> set[int]:
        """eos, the folder's generation_config eos ids, and the end-of-turn tokens it has."""
        ids = {self.eos, self.eod}
        generation = self.folder / "generation_config.json"
        if generation.is_file():
            found = _read_json(generation).get("eos_token_id")
            ids |= set(found if isinstance(found, list) else [found])
        added = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        ids |= {self.backend.token_to_id(t) for t in END_OF_TURN if t in added}
        return {i for i in ids if isinstance(i, int) and i >= 0}

    @property
    def chat_template(self) -> str | None:
        """The chat template transformers found for the folder (chat_template.jinja, or
        tokenizer_config.json's; the "default" one of several), or None."""
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        return template if isinstance(template, str) else None

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "tokenizer_path": [os.path.abspath(self.path)]}

    def files(self) -> list[tuple[str, str]]:
        """(name in a checkpoint, path): the tokenizer files of the folder, under tokenizer/."""
        return [(f"tokenizer/{name}", str(self.folder / name)) for name in HF_FILES if (self.folder / name).is_file()]
