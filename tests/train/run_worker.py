"""Worker for tests/train: every rank builds the RunConfig from each JSON file of sections given and
calls gridtrain.train.loop.run, the same entry point `gridtrain launch` gives each rank, with the same
reader of train.init_from weights."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for json_run

from json_run import load_run  # noqa: E402

from gridtrain.convert.sources import open_weights  # noqa: E402
from gridtrain.train.loop import run  # noqa: E402

if __name__ == "__main__":
    # Several configs train one after the other in the same process: one start-up of torch,
    # DeepSpeed and megatron-core for several one-rank runs. Only for one rank: a second process
    # group over several ranks can meet the first one's addresses in torchrun's store (measured:
    # gloo's connectFullMesh refused at TP=2 x PP=2).
    if len(sys.argv) > 2 and os.environ.get("WORLD_SIZE") != "1":
        sys.exit("run_worker.py: several configs need a world of one rank")
    for path in sys.argv[1:]:
        code = run(*load_run(path), open_weights)
        if code:
            sys.exit(code)
