"""Tokenizers of every kind behind one interface (gridtrain.data.tokenizer), checked against the
libraries that define them: SentencePiece for .model files, transformers' AutoTokenizer for Hugging
Face folders (same ids on a hard text set, the same BOS rule and special ids, the same decoding),
and the bad ones refused in one line."""
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from hf_tokenizers import HARD_TEXTS

from gridtrain.data.tokenizer import SentencePieceTokenizer, load_tokenizer, tokenizer_kind
from gridtrain.errors import UserError


def test_trained_tokenizer(tokenizer_model, corpus_docs):
    tok = load_tokenizer(tokenizer_model)
    assert tok.kind == "sentencepiece" and tokenizer_kind(Path(tokenizer_model).parent) == "sentencepiece"
    info = json.loads((Path(tokenizer_model).parent / "tokenizer_info.json").read_text())
    assert info["special_ids"] == tok.special_ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "eod": 4}
    assert tok.vocab_size == info["vocab_size"] == 700 and tok.piece(tok.eod) == "<eod>"
    for text in corpus_docs[-3:] + ["never seen: ⚡ Ω 𝔘"]:
        ids = tok.encode(text)
        assert tok.eod not in ids and tok.decode(ids) == text  # literal "<eod>" stays text
        assert tok.documents([text]) == [ids + [tok.eod]]  # no BOS in gridtrain's shards
    assert len(tok.encode("𝔘")) >= 4  # an unseen 4-byte character falls back to byte pieces
    stream = tok.stream()
    assert "".join(stream.step(i) for i in tok.encode("naïve 🚀 𝔘")) == "naïve 🚀 𝔘"


def test_external_sentencepiece_model_uses_eos_as_eod(tmp_path, corpus_jsonl):
    docs = [json.loads(line)["text"] for line in open(corpus_jsonl, encoding="utf-8")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(line for d in docs for line in d.splitlines() if line.strip()),
                                   model_prefix=str(tmp_path / "llama"), vocab_size=400, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    tok = SentencePieceTokenizer(str(tmp_path / "llama.model"))
    assert (tok.eod, tok.eos, tok.bos, tok.pad) == (2, 2, 1, -1)


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2", "smollm2"])
def test_huggingface_folders_encode_as_transformers_does(hf_tokenizers, family):
    """Token for token with AutoTokenizer (transformers 5) on the hard text set, special-token strings
    in text split (gridtrain's rule, transformers' split_special_tokens=True); documents are
    transformers' tokenizer(text).input_ids (BOS where the folder adds one) plus eod."""
    from transformers import AutoTokenizer

    folder = hf_tokenizers[family]
    ours = load_tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(folder, split_special_tokens=True)
    assert ours.kind == "huggingface" and ours.vocab_size == len(theirs)
    assert (ours.bos, ours.eos) == (theirs.bos_token_id if theirs.bos_token_id is not None else -1, theirs.eos_token_id)
    assert ours.eod == theirs.eos_token_id
    for text in HARD_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids, repr(text)
        assert ours.documents([text])[0] == theirs(text).input_ids + [ours.eod], repr(text)
        assert ours.decode(ids) == theirs.decode(ids)
        stream = ours.stream()
        assert "".join(stream.step(i) for i in ids) == theirs.decode(ids)  # multi-byte characters printed whole
    assert ours.encode_batch(HARD_TEXTS) == [ours.encode(t) for t in HARD_TEXTS]
    assert (ours.documents(["x"])[0][0] == ours.bos) == (family == "llama3")  # Llama 3 starts with BOS
    # The control: transformers' default (special tokens matched) gives other ids on the same text.
    special = "literal <|endoftext|> and <|im_end|> and <|begin_of_text|> in text"
    assert ours.encode(special) != AutoTokenizer.from_pretrained(folder)(special, add_special_tokens=False).input_ids


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "GPT2Tokenizer"])
def test_add_bos_token_follows_transformers(hf_tokenizers, tmp_path, tokenizer_class):
    """add_bos_token in a configuration means what transformers' class for the folder makes of it
    (measured with transformers 5.23: neither of these two adds a BOS to a ByteLevel pipeline);
    documents follow it either way, because the pipeline is the one transformers builds."""
    from transformers import AutoTokenizer

    folder = shutil.copytree(hf_tokenizers["gpt2"], tmp_path / "gpt2-bos")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, tokenizer_class=tokenizer_class)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder, split_special_tokens=True)
    for text in HARD_TEXTS[:6]:
        assert ours.documents([text])[0] == theirs(text).input_ids + [ours.eod]


def test_stop_ids_and_chat_template(hf_tokenizers):
    qwen = load_tokenizer(hf_tokenizers["qwen2"])
    im_end = qwen.backend.token_to_id("<|im_end|>")
    assert qwen.stop_ids == {qwen.eos, im_end} and "<|im_start|>" in qwen.chat_template
    llama = load_tokenizer(hf_tokenizers["llama3"])
    assert llama.backend.token_to_id("<|eot_id|>") in llama.stop_ids and llama.chat_template.startswith("{{- bos_token")


def test_bad_tokenizers_are_one_line(tmp_path, hf_tokenizers):
    cases = {}
    (tmp_path / "empty").mkdir()
    cases["no tokenizer"] = (tmp_path / "empty", "no tokenizer there; give a SentencePiece .model, a tokenizer.json")
    corrupt = shutil.copytree(hf_tokenizers["gpt2"], tmp_path / "corrupt")
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3')
    cases["corrupt"] = (corrupt, "not a Hugging Face tokenizer.json")
    no_eos = shutil.copytree(hf_tokenizers["llama3"], tmp_path / "no-eos")
    spec = json.loads((no_eos / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in ("<|end_of_text|>",)]
    (no_eos / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    (no_eos / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "eos_token"}))
    cases["no eos"] = (no_eos, "has neither an eos_token (tokenizer_config.json) nor an end-of-text token")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    cases["not sentencepiece"] = (tmp_path / "bad.model", "not a SentencePiece model")
    for what, (path, part) in cases.items():
        with pytest.raises(UserError) as refused:
            load_tokenizer(path)
        assert part in str(refused.value) and "\n" not in str(refused.value), (what, str(refused.value))


def test_bytelevel_training_writes_a_folder_transformers_and_preprocess_read(capsys, tmp_path, corpus_jsonl):
    """`gridtrain tokenizer train --model-type bytelevel`: an HF folder that AutoTokenizer loads and
    encodes as gridtrain does, ending documents with <|endoftext|>, which preprocess then uses."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from gridtrain.launcher.cli import main

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", corpus_jsonl, "--vocab-size", "500", "--model-type", "bytelevel",
                 "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "tokenizer_info.json"}
    ours, theirs = load_tokenizer(out), AutoTokenizer.from_pretrained(out, split_special_tokens=True)
    assert ours.kind == "huggingface" and ours.vocab_size == len(theirs) <= 500
    assert ours.piece(ours.eod) == "<|endoftext|>" and ours.bos == theirs.bos_token_id
    for text in HARD_TEXTS:
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, repr(text)
        assert ours.decode(ours.encode(text)) == text  # byte-level: every text comes back exactly
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("hello world", "def f(x):\n    return x")))
    assert main(["preprocess", "--input", str(docs), "--tokenizer", str(out), "--output-prefix",
                 str(tmp_path / "shards"), "--workers", "1"]) == 0
    shards = IndexedDataset(str(tmp_path / "shards"))
    assert [shards[i].tolist() for i in range(len(shards))] == ours.documents(["hello world", "def f(x):\n    return x"])
