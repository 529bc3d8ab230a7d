"""DataConfig: the data blend, split and sequence layout."""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DataConfig:
    # [[weight, prefix], ...]; prefix names PREFIX.bin / PREFIX.idx.
    blend: tuple = ()
    split: str = "98,1,1"
    seq_length: int = 256
    seed: int = 1234
    tokenizer: Optional[str] = None  # SentencePiece .model path
    # None: <run_dir>/index-cache
    cache_dir: Optional[str] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    num_workers: int = 0
