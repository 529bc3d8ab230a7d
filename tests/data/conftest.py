"""Shared data fixtures: a small real corpus (standard-library sources plus non-ASCII text), a
tokenizer trained on it, and shards preprocessed from it; built once per test session."""
import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from datatest_corpus import EXTRA_DOCS, stdlib_docs, write_jsonl  # noqa: E402

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return stdlib_docs(60) + EXTRA_DOCS


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, corpus_docs) -> str:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_docs)


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory, corpus_jsonl) -> str:
    from gridtrain.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([corpus_jsonl], 700, str(out), threads=1)["model"]


@pytest.fixture(scope="session")
def shard_prefix(tmp_path_factory, corpus_jsonl, tokenizer_model) -> str:
    from gridtrain.data.preprocess import PreprocessOptions, preprocess

    prefix = str(tmp_path_factory.mktemp("shards") / "corpus")
    preprocess(PreprocessOptions(inputs=(corpus_jsonl,), tokenizer=tokenizer_model, output_prefix=prefix),
               open(os.devnull, "w"))
    return prefix
