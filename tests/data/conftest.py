"""The data tests' names for parts of the session corpus (tests/shared_corpus.py)."""
import pytest


@pytest.fixture(scope="session")
def corpus_docs(corpus) -> list[str]:
    return corpus.text_docs


@pytest.fixture(scope="session")
def corpus_jsonl(corpus) -> str:
    return corpus.text_jsonl


@pytest.fixture(scope="session")
def tokenizer_model(corpus) -> str:
    return corpus.tokenizer


@pytest.fixture(scope="session")
def shard_prefix(corpus) -> str:
    return corpus.text
