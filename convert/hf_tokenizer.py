"""Hugging Face tokenizer files for a gridtrain SentencePiece model: tokenizer.model (the model
itself), tokenizer.json and tokenizer_config.json, so that `AutoTokenizer.from_pretrained(folder)`
encodes exactly as SentencePiece does.

transformers builds the tokenizers pipeline from the .model (its LlamaTokenizer conversion), but
that pipeline differs from SentencePiece in two measured ways (20-30% of test strings): its
Metaspace pre-tokenizer adds the dummy-prefix "▁" only when the text does not already start with
one (SentencePiece always adds it), and it turns "</s>", "<eod>" written in text into control ids
(SentencePiece never produces control ids from text). The pipeline written here keeps the
converted vocabulary and merges but uses the Llama-2-era normalizer (prepend "▁", spaces -> "▁",
no pre-tokenizer), adds no BOS (gridtrain's data has none), and sets split_special_tokens; the
tokenizer class is the generic one, so transformers loads tokenizer.json as written."""
import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import normalizers
from transformers import AutoTokenizer

from gridtrain.data.spm_model import load_processor, special_ids


def special_tokens(model_path: str) -> dict:
    """{"bos": (id, piece), ...} for the ids the model has (-1: absent)."""
    processor = load_processor(model_path)
    return {name: (i, processor.IdToPiece(i)) for name, i in special_ids(processor).items() if i >= 0}


def write_tokenizer_files(model_path: str, out: Path, max_length: int) -> dict:
    """Write tokenizer.model, tokenizer.json and tokenizer_config.json into `out`; returns the
    special token ids (bos, eos, pad, unk, eod) for the model and generation configs."""
    specials = special_tokens(model_path)
    shutil.copyfile(model_path, out / "tokenizer.model")
    tokens = {f"{name}_token": piece for name, (_, piece) in specials.items() if name in ("bos", "eos", "unk", "pad")}
    with tempfile.TemporaryDirectory(prefix="gridtrain-tok-") as scratch:
        shutil.copyfile(model_path, Path(scratch) / "tokenizer.model")
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
    return {name: i for name, (i, _) in specials.items()}
