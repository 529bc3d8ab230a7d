"""CheckpointConfig: where checkpoints go, how often they are saved and how many are kept."""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class CheckpointConfig:
    # None: <run_dir>/checkpoints
    dir: Optional[str] = None
    interval_steps: int = 0  # 0: off
    interval_minutes: float = 0.0  # 0: off
    keep_last: int = 3
    keep_every: int = 0  # keep every M-th step permanently; 0: off
    # With train.resume=none and checkpoints already in `dir`: false refuses to start; true moves
    # them aside to <dir>.replaced-<UTC time> (nothing is deleted) and starts fresh.
    overwrite: bool = False
    # Interval saves stall training only while each rank copies its shard to host memory; files are
    # written, fsynced and published in the background, at most one save at a time. Forced saves
    # (a stop signal, the last step) stay synchronous. Off by default: see README "Checkpoints".
    async_save: bool = False
