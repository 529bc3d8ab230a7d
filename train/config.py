"""Optimizer, training-loop, checkpoint and logging sections of a run config."""
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # None: decay over train.steps.
    decay_steps: Optional[int] = None


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 32
    micro_batch_size: int = 4
    seed: int = 1234
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    run_dir: str = "runs/default"
    eval_interval: int = 100
    eval_steps: int = 10
    # Peak FLOP/s per device for MFU; None: measured by a matmul probe at start-up (CPU).
    peak_flops: Optional[float] = None
    resume: str = "auto"  # "auto" | "none" | a checkpoint path
    # Initial weights from a Hugging Face folder or a gridtrain checkpoint instead of random ones
    # (fresh optimizer, step 0, data position 0); a checkpoint of this run, when resumed, wins.
    init_from: Optional[str] = None


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


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    jsonl: bool = True
    tensorboard: bool = True
    # Weights & Biases (the `wandb` extra): the same records as metrics.jsonl, from rank 0. A project
    # turns it on; a restarted run continues the same W&B run (its id is kept in the run folder).
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_name: Optional[str] = None  # None: the run folder's name
    wandb_mode: Literal["online", "offline"] = "online"
    wandb_tags: tuple = ()
