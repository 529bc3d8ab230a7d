"""DataConfig: the data blend, split and sequence layout, and the blend's rules (its shape, and
that its shards exist), which validation, the pre-spawn checks and the dataset builder share."""
import json
import os
import re
from dataclasses import dataclass
from typing import Literal, Optional

from gridtrain.data.shards import LOSS_MASK_SUFFIX

Problem = tuple[str, object, str]
FINE_TUNING_FORMATS = ("completion", "chat")
_NUMBERED = re.compile(r"(_part\d{3}of\d{3})?(_\d{5})?$")


@dataclass(frozen=True)
class DataConfig:
    # [[weight, prefix], ...]; prefix names PREFIX.bin / PREFIX.idx.
    blend: tuple = ()
    split: str = "98,1,1"
    seq_length: int = 256
    seed: int = 1234
    # A SentencePiece .model, a tokenizer.json, or a Hugging Face folder (gridtrain.data.tokenizer).
    tokenizer: Optional[str] = None
    # None: <run_dir>/index-cache
    cache_dir: Optional[str] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    num_workers: int = 0
    # Fine-tuning shards (gridtrain.data.finetune): several documents per sequence, attention and
    # positions restarting in each (false: one per sequence, padded); a document longer than
    # seq_length + 1 tokens is cut ("truncate") or left out ("drop"), and counted.
    pack: bool = True
    overlong: Literal["truncate", "drop"] = "truncate"


def blend_problems(blend) -> list[Problem]:
    """The shape of data.blend: a non-empty list of [positive weight, prefix without .bin/.idx]."""
    fix = "must be a list of [weight, prefix] pairs, e.g. [[1.0, data/corpus_text_document]]"
    if not blend:
        return [("data.blend", list(blend), fix + " (the shards gridtrain preprocess wrote)")]
    problems = []
    for i, entry in enumerate(blend):
        field = f"data.blend[{i}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            problems.append((field, entry, fix))
            continue
        weight, prefix = entry
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            problems.append((field, list(entry), "weight must be a positive number, e.g. [0.3, data/wiki_text_document]"))
        if not isinstance(prefix, str) or not prefix:
            problems.append((field, list(entry), "prefix must be a path string naming PREFIX.bin / PREFIX.idx"))
        elif prefix.endswith((".bin", ".idx")):
            problems.append((field, list(entry), f"give the prefix without .bin/.idx: {prefix[:-4]}"))
    return problems


def missing_shard_problems(blend) -> list[Problem]:
    """Blend prefixes without both PREFIX.bin and PREFIX.idx on disk (a well-formed blend)."""
    problems = []
    for i, (_, prefix) in enumerate(blend):
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(f"{prefix}{ext}")]
        if missing:
            problems.append((f"data.blend[{i}]", prefix, f"no {' or '.join(prefix + m for m in missing)}; "
                             "run `gridtrain preprocess` or fix the prefix"))
    return problems


def shard_format(prefix: str) -> str:
    """"text", or the fine-tuning format of the shard at `prefix`: from the preprocess summary
    (PREFIX.summary.json, or that of the output prefix a numbered or --part shard came from), else
    "completion" when a loss mask lies beside it."""
    base = _NUMBERED.sub("", prefix)
    for candidate in dict.fromkeys((prefix, base, re.sub(r"_\d{5}$", "", prefix))):
        path = candidate + ".summary.json"
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    fmt = json.load(f).get("format", "text")
            except (OSError, ValueError):
                continue
            return fmt if fmt in FINE_TUNING_FORMATS else "text"
    return "completion" if os.path.isfile(prefix + LOSS_MASK_SUFFIX + ".idx") else "text"


def finetune_problems(blend) -> list[tuple[str, object, str]]:
    """A fine-tuning blend's rules: no text shard in it, every loss mask present, whole weights.
    [] for a text blend. The blend must be well formed with its shards on disk."""
    formats = [shard_format(prefix) for _, prefix in blend]
    if all(fmt == "text" for fmt in formats):
        return []
    problems = []
    for i, ((weight, prefix), fmt) in enumerate(zip(blend, formats)):
        field = f"data.blend[{i}]"
        if fmt == "text":
            problems.append((field, prefix, "is text shards in a blend of fine-tuning shards (preprocess --format "
                             "completion/chat); fine-tune on fine-tuning shards only, or preprocess this text with "
                             "--format completion"))
            continue
        missing = [prefix + LOSS_MASK_SUFFIX + ext for ext in (".bin", ".idx")
                   if not os.path.isfile(prefix + LOSS_MASK_SUFFIX + ext)]
        if missing:
            problems.append((field, prefix, f"is a {fmt} shard without its loss mask ({missing[0]} is missing); "
                             "copy the _loss_mask files with the shard, or preprocess it again"))
        if float(weight) != int(weight):
            problems.append((field, [weight, prefix], "a fine-tuning weight is how often each document appears per "
                             f"epoch: use a whole number, e.g. [{max(1, round(weight))}, {prefix}]"))
    return problems


def is_finetune_blend(blend) -> bool:
    return any(shard_format(prefix) != "text" for _, prefix in blend)
