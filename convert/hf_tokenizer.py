"""The tokenizer files of a Hugging Face folder `convert --to hf` writes, so that
`AutoTokenizer.from_pretrained(folder)` encodes exactly as the run's tokenizer did.

A Hugging Face tokenizer (tokenizer.json and its configuration) is copied through unchanged; a
tokenizer_config.json naming its special tokens is written when the source had none.

A SentencePiece model gets tokenizer.model (the model itself), tokenizer.json and
tokenizer_config.json. transformers builds the tokenizers pipeline from the .model (its
LlamaTokenizer conversion), but that pipeline differs from SentencePiece in two measured ways (20-30%
of test strings): its Metaspace pre-tokenizer adds the dummy-prefix "▁" only when the text does
not already start with one (SentencePiece always adds it), and it turns "</s>", "<eod>" written in
text into control ids (SentencePiece never produces control ids from text). The pipeline written
here keeps the converted vocabulary and merges but uses the Llama-2-era normalizer (prepend "▁",
spaces -> "▁", no pre-tokenizer), adds no BOS (gridtrain's data has none), and sets
split_special_tokens; the tokenizer class is the generic one, so transformers loads tokenizer.json
as written."""
import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import normalizers
from transformers import AutoTokenizer

NAMED = ("bos", "eos", "unk", "pad")


def write_tokenizer_files(tokenizer, out: Path, max_length: int) -> dict:
    """Write the tokenizer's files into `out`; returns the special ids it has (bos, eos, pad, unk,
    eod) for the model and generation configs."""
    ids = {name: i for name, i in tokenizer.special_ids.items() if i >= 0}
    if tokenizer.kind == "huggingface":
        for name, path in tokenizer.files():
            shutil.copyfile(path, out / Path(name).name)
        if not (out / "tokenizer_config.json").exists():
            tokens = {f"{n}_token": tokenizer.piece(ids[n]) for n in NAMED if n in ids}
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens, "model_max_length": max_length}
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return ids
    _sentencepiece_files(tokenizer, out, max_length, ids)
    return ids


def _sentencepiece_files(tokenizer, out: Path, max_length: int, ids: dict) -> None:
    shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    tokens = {f"{name}_token": tokenizer.piece(ids[name]) for name in NAMED if name in ids}
    with tempfile.TemporaryDirectory(prefix="gridtrain-tok-") as scratch:
        shutil.copyfile(tokenizer.path, Path(scratch) / "tokenizer.model")
        (Path(scratch) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **tokens}))
        converted = AutoTokenizer.from_pretrained(scratch).backend_tokenizer
    converted.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    converted.pre_tokenizer = None
    converted.post_processor = None  # no BOS/EOS added: gridtrain encodes text as SentencePiece does
    converted.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": max_length}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
