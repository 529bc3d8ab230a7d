"""A small SentencePiece tokenizer and one Megatron shard built from given documents, for tests
that train through the real loop."""
from pathlib import Path


def build_tiny_corpus(root: Path, docs: list[str], vocab_size: int) -> dict:
    """Train a BPE tokenizer on `docs` and write them (+ EOD each) as root/shard.{bin,idx}.
    Returns {"tokenizer": path of the .model, "prefix": shard prefix}."""
    import numpy as np
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from gridtrain.data.tokenizer import SentencePieceTokenizer

    (root / "corpus.txt").write_text("\n".join(docs) + "\n")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "tok"),
                                   vocab_size=vocab_size, model_type="bpe", hard_vocab_limit=False,
                                   minloglevel=2)
    tokenizer = SentencePieceTokenizer(str(root / "tok.model"))
    builder = IndexedDatasetBuilder(str(root / "shard.bin"), dtype=np.int32)
    for doc in docs:
        ids = tokenizer.tokenize(doc) + [tokenizer.eod]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(root / "shard.idx"))
    return {"tokenizer": str(root / "tok.model"), "prefix": str(root / "shard")}
