"""The vocabulary part of a GGUF file, as llama.cpp's own converter writes it (convert_hf_to_gguf:
_set_vocab_sentencepiece, get_vocab_base) and its loader reads it (src/llama-vocab.cpp).

- SentencePiece: tokenizer.ggml.model "llama", pieces with scores and token types.
- Byte-level BPE (GPT-2, Llama 3, Qwen 2/2.5/3, SmolLM2, and `tokenizer train --model-type
  bytelevel`): tokenizer.ggml.model "gpt2", the byte-encoded tokens, their types (special added
  tokens CONTROL, other added tokens USER_DEFINED), the merges, and tokenizer.ggml.pre: the name of
  llama.cpp's pre-tokenizer that splits text as the tokenizer's own does. llama.cpp refuses to load
  a name it does not know, and its converter finds the name by hashing a known model's output;
  gridtrain reads it from the pre-tokenizer itself (its regex), which also names a retrained
  vocabulary of a known family. The tokenizer.json file's pre-tokenizer is read first, as the
  converter saw it: transformers 5 rebuilds some classes' own instead (GPT2Tokenizer drops SmolLM2's
  Digits step; with its digit-free merges both split alike). Anything else is refused in one line.

Both: bos/eos/unk/pad ids, whether a BOS starts a document (llama.cpp's tokenize adds it then),
and the token list padded to the model's vocab rows with [PADi] (UNUSED) tokens, since llama.cpp
takes the number of embedding rows from the token list."""
import json
from pathlib import Path

import gguf

from gridtrain.errors import UserError

# The split regexes of llama.cpp's BPE pre-tokenizers (llama-vocab.cpp, llm_tokenizer_bpe) as the
# published tokenizer.json files write them, with the name the loader recognises.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def llama_cpp_pre(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or None when none of its matches."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        regex = split.get("pattern", {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            return SPLIT_NAMES.get(regex)
    return None


def write_vocab(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """The tokenizer (gridtrain.data.tokenizer, either kind) for `vocab_size` embedding rows."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{vocab_size} embedding rows; export the checkpoint of a model that covers its tokenizer")
    if tokenizer.kind == "sentencepiece":
        _sentencepiece(writer, tokenizer, vocab_size)
    else:
        _byte_level_bpe(writer, tokenizer, vocab_size)
    ids = tokenizer.special_ids
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids.get(name, -1) >= 0:
            add(ids[name])
    bos = tokenizer.bos >= 0 and tokenizer.documents(["a"])[0][0] == tokenizer.bos
    writer.add_add_bos_token(bool(bos))
    writer.add_add_eos_token(False)


def _padding(tokens: list, types: list, vocab_size: int, scores: list | None = None) -> None:
    for i in range(len(tokens), vocab_size):  # model rows beyond the tokenizer: never produced
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _sentencepiece(writer, tokenizer, vocab_size: int) -> None:
    sp = tokenizer.processor
    pieces, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        pieces.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        types.append(gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                     else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                     else gguf.TokenType.NORMAL)
    _padding(pieces, types, vocab_size, scores)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _byte_level_bpe(writer, tokenizer, vocab_size: int) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    published = json.loads(Path(tokenizer.json_path).read_text(encoding="utf-8"))
    model, name = spec.get("model", {}), None
    if model.get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        name = llama_cpp_pre(published.get("pre_tokenizer")) or llama_cpp_pre(spec.get("pre_tokenizer"))
    if name is None:
        described = json.dumps(spec.get("pre_tokenizer"))[:200]
        raise UserError(f"--to gguf: {tokenizer.path}: its pre-tokenizer ({described}) is none llama.cpp knows "
                        "(byte-level BPE like GPT-2, Llama 3, Qwen 2 or SmolLM); export with --to hf instead")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    by_id = {i: token for token, i in vocab.items()}
    added = {t.content: t.special for t in tokenizer.backend.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token.encode("utf-8"))
        special = added.get(token)
        types.append(gguf.TokenType.NORMAL if special is None else
                     gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    _padding(tokens, types, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise UserError(f"--to gguf: {tokenizer.path}: a BPE tokenizer without merges; llama.cpp needs them")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
