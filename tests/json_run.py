"""A run config from a JSON file of sections, and its Layout for the world torchrun started: what
the training workers of tests/train give gridtrain.train.loop.run, as `gridtrain launch` would."""
import json
import os
from pathlib import Path

from gridtrain.data.config import DataConfig
from gridtrain.model.config import ModelConfig
from gridtrain.parallel.config import OptimConfig, ParallelConfig
from gridtrain.parallel.layout import Layout, build_layout
from gridtrain.train.checkpoint.config import CheckpointConfig
from gridtrain.train.config import LoggingConfig, TrainConfig
from gridtrain.train.run_config import RunConfig

SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}


def load_run(path: str) -> tuple[RunConfig, Layout]:
    sections = json.loads(Path(path).read_text(encoding="utf-8"))
    if "blend" in sections.get("data", {}):
        sections["data"]["blend"] = tuple(tuple(entry) for entry in sections["data"]["blend"])
    cfg = RunConfig(**{name: SECTIONS[name](**values) for name, values in sections.items()})
    layout = build_layout(cfg.parallel, cfg.train.micro_batch_size, cfg.train.global_batch_size,
                          int(os.environ["WORLD_SIZE"]))
    return cfg, layout
