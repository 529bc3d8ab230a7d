"""Worker for test_checkpoint_resume.py: one rank of a real training run through
gridtrain.train.loop.run (what `gridtrain launch` gives each rank), built from a JSON file of config
sections. It also records, per rank, the step a run resumed at and the global sample ids of every
micro-batch the engine consumed (<run_dir>/samples.rank<R>.jsonl), observing the real objects'
calls without changing them, so the test can check that no sample is skipped or seen twice."""
import json
import os
import sys
from pathlib import Path

from gridtrain.data.config import DataConfig
from gridtrain.launcher.run_config import RunConfig
from gridtrain.model.config import ModelConfig
from gridtrain.parallel import engine as engine_mod
from gridtrain.parallel.config import ParallelConfig
from gridtrain.train.checkpoint import checkpointer as checkpoint_mod
from gridtrain.train.config import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from gridtrain.train.loop import run

SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}


def load_config(path: str) -> RunConfig:
    sections = json.loads(Path(path).read_text(encoding="utf-8"))
    sections["data"]["blend"] = tuple(tuple(entry) for entry in sections["data"].get("blend", ()))
    return RunConfig(**{name: SECTIONS[name](**values) for name, values in sections.items()})


def record_to(log: Path) -> None:
    def write(entry: dict) -> None:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    original_resume = checkpoint_mod.Checkpointer.resume
    original_step = engine_mod.TrainEngine.train_step

    def resume(self, engine):
        state = original_resume(self, engine)
        write({"resumed": state.step if state else 0})
        return state

    def train_step(self, micro_batches):
        taken = []

        def tap():
            for batch in micro_batches:
                taken.append(batch["sample_ids"].tolist())
                yield batch

        result = original_step(self, tap())
        write({"ids": [i for ids in taken for i in ids]})
        return result

    checkpoint_mod.Checkpointer.resume = resume
    engine_mod.TrainEngine.train_step = train_step


if __name__ == "__main__":
    cfg = load_config(sys.argv[1])
    record_to(Path(cfg.train.run_dir) / f"samples.rank{os.environ['RANK']}.jsonl")
    sys.exit(run(cfg))
