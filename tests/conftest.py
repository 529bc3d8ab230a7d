import sys
from pathlib import Path

import pytest

# Test helpers (multirank.py, shared_corpus.py, run_config.py) import by plain name under pytest's
# importlib mode.
sys.path.insert(0, str(Path(__file__).parent))
from shared_corpus import Corpus, build_corpus  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """The session's one corpus, tokenizer and shards (tests/shared_corpus.py)."""
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def text_corpus(corpus) -> dict:
    """{"tokenizer", "prefix"}: real text (standard-library sources and non-ASCII documents)."""
    return corpus.data(corpus.text)


@pytest.fixture(scope="session")
def sentences_corpus(corpus) -> dict:
    """{"tokenizer", "prefix"}: short repetitive documents a tiny model learns within tens of steps."""
    return corpus.data(corpus.sentences)


@pytest.fixture(scope="session")
def hf_tokenizers(corpus, tmp_path_factory) -> dict:
    """family -> Hugging Face tokenizer folder (tests/hf_tokenizers.py): gpt2, llama3, qwen2, smollm2:
    byte-level BPEs trained on the session corpus."""
    from hf_tokenizers import FAMILIES, save_folder
    from shared_corpus import sentence_docs

    root = tmp_path_factory.mktemp("hf-tokenizers")
    texts = corpus.text_docs + sentence_docs()
    return {family: save_folder(family, texts, root / family) for family in FAMILIES}
