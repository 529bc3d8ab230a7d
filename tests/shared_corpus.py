"""The one corpus of the test session (a uniquely named module: tests/ folders are not packages):
one SentencePiece tokenizer trained by `gridtrain tokenizer train`'s code on all of it, and two
shard prefixes written by `gridtrain preprocess`'s code:

- text: 60 standard-library sources plus non-ASCII and whitespace-heavy documents (what the data
  tests read back and what conversion and bf16 runs train on);
- sentences: 300 documents, each four fixed sentences from a random starting point, so nearly
  every next token is predictable once the order is learned (learning, resume and launch tests).

tests/conftest.py builds it once per session (once per pytest-xdist worker)."""
import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXTRA_DOCS = [
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🚀 and a literal <eod> inside text",
    "short",
    "tabs\tand\n\n  blank lines\n\nkept as they are\n",
]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a small model learns to repeat what it has seen.",
    "rain falls on the green hills every spring.",
    "seven cats sleep on the warm red roof.",
]
VOCAB_SIZE = 700
MODEL_VOCAB = 768  # VOCAB_SIZE rounded up to Megatron's multiple of 128


def stdlib_docs(count: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    docs = []
    for name in names:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            text = f.read()
        if text.strip() and len(text) < 60_000:
            docs.append(text)
        if len(docs) == count:
            break
    return docs


def sentence_docs(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        start = rng.randrange(len(SENTENCES))
        docs.append(" ".join(SENTENCES[(start + i) % len(SENTENCES)] for i in range(len(SENTENCES))))
    return docs


def write_jsonl(path, docs, key="text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc, "meta": 1}) + "\n")
    return str(path)


@dataclass(frozen=True)
class Corpus:
    tokenizer: str  # the SentencePiece .model
    text: str  # shard prefix of text_docs
    sentences: str  # shard prefix of sentence docs
    text_docs: list
    text_jsonl: str

    def data(self, prefix: str) -> dict:
        """{"tokenizer", "prefix"} of one of the two prefixes, what run configs take."""
        return {"tokenizer": self.tokenizer, "prefix": prefix}


def build_corpus(root: Path) -> Corpus:
    from gridtrain.data.preprocess import PreprocessOptions, preprocess
    from gridtrain.data.tokenizer_train import train_tokenizer

    text_docs = stdlib_docs(60) + EXTRA_DOCS
    text_jsonl = write_jsonl(root / "text.jsonl", text_docs)
    sentences_jsonl = write_jsonl(root / "sentences.jsonl", sentence_docs())
    model = train_tokenizer([text_jsonl, sentences_jsonl], VOCAB_SIZE, str(root / "tok"), threads=1)["model"]
    prefixes = {}
    with open(os.devnull, "w") as quiet:
        for name, jsonl in (("text", text_jsonl), ("sentences", sentences_jsonl)):
            prefixes[name] = str(root / name)
            preprocess(PreprocessOptions(inputs=(jsonl,), tokenizer=model, output_prefix=prefixes[name]), quiet)
    return Corpus(model, prefixes["text"], prefixes["sentences"], text_docs, text_jsonl)
