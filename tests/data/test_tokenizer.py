"""The tokenizer: special ids, EOD that text cannot fake, byte fallback, exact round trip, and an
external SentencePiece model (Llama-style: no <eod>, no pad) behind the same class."""
import json
from pathlib import Path

import sentencepiece as spm
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from gridtrain.data.tokenizer import SentencePieceTokenizer


def test_trained_tokenizer(tokenizer_model, corpus_docs):
    tok = SentencePieceTokenizer(tokenizer_model)
    assert isinstance(tok, MegatronLegacyTokenizer)
    info = json.loads((Path(tokenizer_model).parent / "tokenizer.json").read_text())
    assert info["special_ids"] == tok.special_ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "eod": 4}
    assert tok.vocab_size == info["vocab_size"] == 700 and tok.vocab["<eod>"] == tok.eod
    for text in corpus_docs[-3:] + ["never seen: ⚡ Ω 𝔘"]:
        ids = tok.tokenize(text)
        assert tok.eod not in ids and tok.detokenize(ids) == text  # literal "<eod>" stays text
    assert len(tok.tokenize("𝔘")) >= 4  # an unseen 4-byte character falls back to byte pieces


def test_external_model_uses_eos_as_eod(tmp_path, corpus_jsonl):
    docs = [json.loads(line)["text"] for line in open(corpus_jsonl, encoding="utf-8")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(l for d in docs for l in d.splitlines() if l.strip()),
                                   model_prefix=str(tmp_path / "llama"), vocab_size=400, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    tok = SentencePieceTokenizer(str(tmp_path / "llama.model"))
    assert (tok.eod, tok.eos, tok.bos, tok.pad) == (2, 2, 1, -1)
