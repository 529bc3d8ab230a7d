"""The training-loop and logging sections of a run config (the optimizer section is
gridtrain.parallel.optim's, the checkpoint section gridtrain.train.checkpoint.config's)."""
from dataclasses import dataclass
from typing import Literal, Optional


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
