"""Worker for tests/train: every rank builds the RunConfig from a JSON file of sections and calls
gridtrain.train.loop.run, the same entry point `gridtrain launch` gives each rank."""
import json
import sys

from gridtrain.data.config import DataConfig
from gridtrain.launcher.run_config import RunConfig
from gridtrain.model.config import ModelConfig
from gridtrain.parallel.config import ParallelConfig
from gridtrain.train.config import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from gridtrain.train.loop import run

SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        sections = json.load(f)
    if "blend" in sections.get("data", {}):
        sections["data"]["blend"] = tuple(tuple(entry) for entry in sections["data"]["blend"])
    cfg = RunConfig(**{name: SECTIONS[name](**values) for name, values in sections.items()})
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
