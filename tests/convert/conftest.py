"""Shared fixture of the conversion tests: a gridtrain tokenizer (byte fallback, <eod>) and shards of
real text."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # convert_runs
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # datatest_corpus
from datatest_corpus import EXTRA_DOCS, stdlib_docs, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> dict:
    """{"tokenizer": .model, "prefix": shard prefix} from 40 stdlib files and some non-ASCII text."""
    from gridtrain.data.preprocess import PreprocessOptions, preprocess
    from gridtrain.data.tokenizer_train import train_tokenizer

    root = tmp_path_factory.mktemp("convert-corpus")
    jsonl = write_jsonl(root / "corpus.jsonl", stdlib_docs(40) + EXTRA_DOCS)
    model = train_tokenizer([jsonl], 600, str(root / "tok"), threads=1)["model"]
    prefix = str(root / "corpus")
    preprocess(PreprocessOptions(inputs=(jsonl,), tokenizer=model, output_prefix=prefix), open(os.devnull, "w"))
    return {"tokenizer": model, "prefix": prefix}
