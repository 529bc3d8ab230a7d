"""DataConfig: the data blend, split and sequence layout, and the blend's rules (its shape, and
that its shards exist), which validation, the pre-spawn checks and the dataset builder share."""
import os
from dataclasses import dataclass
from typing import Optional

Problem = tuple[str, object, str]


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
