"""Worker for test_checkpoint_resume.py: one rank of a real training run through
gridtrain.train.loop.run (what `gridtrain launch` gives each rank), built from a JSON file of config
sections. It also records, per rank, the step a run resumed at and the global sample ids of every
micro-batch the engine consumed (<run_dir>/samples.rank<R>.jsonl), observing the real objects'
calls without changing them, so the test can check that no sample is skipped or seen twice.

GRIDTRAIN_TEST_WRITE_DELAY=S slows every write of a checkpoint file by S seconds (a throttled disk),
so a test can act while a background save is still being written."""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # tests/, for json_run

from json_run import load_run  # noqa: E402

from gridtrain.parallel import engine as engine_mod  # noqa: E402
from gridtrain.train.checkpoint import checkpointer as checkpoint_mod  # noqa: E402
from gridtrain.train.checkpoint import save as save_mod  # noqa: E402
from gridtrain.train.loop import run  # noqa: E402


def record_to(log: Path) -> None:
    def write(entry: dict) -> None:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    original_resume = checkpoint_mod.Checkpointer.resume
    original_step = engine_mod.TrainEngine.train_step

    def resume(self, engine, mode="auto"):
        state = original_resume(self, engine, mode)
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


def throttle_writes(delay: float) -> None:
    original = save_mod._FlushingSink.write

    def write(self, data):
        time.sleep(delay)
        return original(self, data)

    save_mod._FlushingSink.write = write


if __name__ == "__main__":
    if os.environ.get("GRIDTRAIN_TEST_WRITE_DELAY"):
        throttle_writes(float(os.environ["GRIDTRAIN_TEST_WRITE_DELAY"]))
    cfg, layout = load_run(sys.argv[1])
    record_to(Path(cfg.train.run_dir) / f"samples.rank{os.environ['RANK']}.jsonl")
    sys.exit(run(cfg, layout))
