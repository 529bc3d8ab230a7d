"""Training stall per checkpoint save, asynchronous (`checkpoint.async_save`) vs synchronous, same
state and same training loop, measured in the same run: 2 ZeRO-2 ranks of bench_checkpoint's ~25M
parameter model (~0.4 GB per checkpoint with fp32 master weights and Adam moments), a save every
SAVE_EVERY steps through `Checkpointer.maybe_save`, as `gridtrain train` calls it. Also the step time
while a background write is in flight vs without one: on 2 cores the writer thread competes with
training for the CPU, which a GPU node (training on the device) does not.

Run: `make bench` or `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_checkpoint_async.py`
(re-launches itself on 2 ranks through torch's elastic agent). GRIDTRAIN_BENCH_DIR picks the disk."""
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_checkpoint import NPROC, build_engine, dist_broadcast, relaunch

SAVES = 6
SAVE_EVERY = 12  # steps; long enough for a background write to finish between saves here


def train_step(engine) -> None:
    import torch

    loss = engine(torch.randn(4, engine.module[0].in_features)).square().mean()
    engine.backward(loss)
    engine.step()


def run_mode(engine, root: Path, async_save: bool) -> tuple[list[float], list[float], list[float]]:
    """(stall per save, step seconds with a background save in flight, step seconds without)."""
    import torch.distributed as dist

    from gridtrain.parallel.layout import Layout
    from gridtrain.train.checkpoint.checkpointer import Checkpointer, RunRecord
    from gridtrain.train.checkpoint.config import CheckpointConfig
    from gridtrain.train.checkpoint.state import TrainState

    world = dist.get_world_size()
    layout = Layout(tp=1, pp=1, dp=world, zero_stage=2, micro_batch_size=4, global_batch_size=4 * world)
    cfg = CheckpointConfig(interval_steps=SAVE_EVERY, keep_last=1, async_save=async_save)
    ckpt = Checkpointer(cfg, layout, RunRecord(ckpt_dir=root / ("async" if async_save else "sync")))
    stalls, busy, idle = [], [], []
    for step in range(1, (SAVES + 1) * SAVE_EVERY):  # the last save has steps after it, as in training
        writing = ckpt.in_flight is not None
        started = time.perf_counter()
        train_step(engine)
        (busy if writing else idle).append(time.perf_counter() - started)
        stalls += [result.stall for result in ckpt.maybe_save(engine, TrainState(step=step))]
    stalls += [result.stall for result in ckpt.close()]
    ckpt.deleter.wait()
    return stalls, busy, idle


def worker() -> int:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    base = os.environ.get("GRIDTRAIN_BENCH_DIR", tempfile.gettempdir())
    root = Path(dist_broadcast(tempfile.mkdtemp(prefix="gridtrain-bench-async-", dir=base) if rank == 0 else None))
    engine = build_engine()
    try:
        sync = run_mode(engine, root, async_save=False)
        background = run_mode(engine, root, async_save=True)
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if rank == 0:
        report(sync, background)
    return 0


def report(sync, background) -> None:
    print(f"{'mode':>6} {'saves':>6} {'stall s per save (each)':>34} {'step ms, no write':>18} {'step ms, writing':>17}")
    for name, (stalls, busy, idle) in (("sync", sync), ("async", background)):
        each = " ".join(f"{s:.3f}" for s in stalls)
        writing = f"{statistics.median(busy) * 1e3:.1f}" if busy else "-"
        print(f"{name:>6} {len(stalls):>6} {each:>34} {statistics.median(idle) * 1e3:>18.1f} {writing:>17}")
    slowdown = statistics.median(background[1]) / statistics.median(background[2])
    print(f"step time while a background write is in flight / without: {slowdown:.2f} "
          f"({NPROC} ranks and the writer threads share this machine's {os.cpu_count()} cores)")
    ratio = statistics.median(background[0]) / statistics.median(sync[0])
    print(f"training stall per save, async / sync (median of {SAVES}, {NPROC} ZeRO-2 ranks): {ratio:.3f} "
          "(target <= 0.2)", flush=True)


if __name__ == "__main__":
    sys.exit(worker() if "RANK" in os.environ else relaunch(__file__))
