import os
import sys
from pathlib import Path

import pytest

# Test helpers (multirank.py) import by plain name under pytest's importlib mode.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "data"))  # datatest_corpus
from datatest_corpus import EXTRA_DOCS, stdlib_docs, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> dict:
    """{"tokenizer": .model, "prefix": shard prefix}: a gridtrain tokenizer (byte fallback, <eod>)
    and shards of 40 stdlib files and some non-ASCII text, written by `gridtrain preprocess`."""
    from gridtrain.data.preprocess import PreprocessOptions, preprocess
    from gridtrain.data.tokenizer_train import train_tokenizer

    root = tmp_path_factory.mktemp("text-corpus")
    jsonl = write_jsonl(root / "corpus.jsonl", stdlib_docs(40) + EXTRA_DOCS)
    model = train_tokenizer([jsonl], 600, str(root / "tok"), threads=1)["model"]
    prefix = str(root / "corpus")
    preprocess(PreprocessOptions(inputs=(jsonl,), tokenizer=model, output_prefix=prefix), open(os.devnull, "w"))
    return {"tokenizer": model, "prefix": prefix}
