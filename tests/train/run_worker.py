"""Worker for tests/train: every rank builds the RunConfig from a JSON file of sections and calls
gridtrain.train.loop.run, the same entry point `gridtrain launch` gives each rank, with the same
reader of train.init_from weights."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for json_run

from json_run import load_run  # noqa: E402

from gridtrain.convert.sources import open_weights  # noqa: E402
from gridtrain.train.loop import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(*load_run(sys.argv[1]), open_weights))
