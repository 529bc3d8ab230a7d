"""Checkpoint write throughput against this disk's sequential write speed, both measured here in
the same run and the same folder: `dd`-style writes of random bytes with fdatasync (the baseline) vs
gridtrain's full save (DeepSpeed shards of 2 ZeRO-2 ranks + RNG + state, fsync, sha256 manifest,
atomic publish). The training stall per save is the save's wall time: saving is synchronous.
Deleting the checkpoint that retention retires runs on a background thread during training; here
it is waited for after each save, outside the timed save and before the dd write, and printed.

Run: `make bench` or `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_checkpoint.py`
(re-launches itself on 2 ranks through torch's elastic agent). GRIDTRAIN_BENCH_DIR picks the disk."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, DEPTH = 2048, 6  # ~25M parameters: ~0.4 GB checkpoint with Adam moments and fp32 master
REPEATS = 5
NPROC = 2


def relaunch(script: str = __file__) -> int:
    """Run `script` on NPROC ranks through torch's elastic agent."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={NPROC}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=0", script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, env=env).returncode


def dd_write(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` in 4 MiB blocks and fdatasync, like `dd conv=fdatasync`. The block
    is random bytes, like weights: this machine's virtual disk writes zeros several times faster
    (measured 2.3 GB/s for zeros vs 0.34 GB/s), which would make the baseline a fiction."""
    block = os.urandom(4 * 2**20)
    start = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(-(-nbytes // len(block))):
            fh.write(block)
        fh.flush()
        os.fdatasync(fh.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def build_engine():
    import deepspeed
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    loss = engine(torch.randn(1, WIDTH)).square().mean()  # one step so Adam moments exist
    engine.backward(loss)
    engine.step()
    return engine


def checkpointer(root: Path):
    import torch.distributed as dist

    from gridtrain.parallel.layout import Layout
    from gridtrain.train.checkpoint.checkpointer import Checkpointer, RunRecord
    from gridtrain.train.checkpoint.config import CheckpointConfig

    world = dist.get_world_size()
    layout = Layout(tp=1, pp=1, dp=world, zero_stage=2, micro_batch_size=1, global_batch_size=world)
    return Checkpointer(CheckpointConfig(keep_last=1), layout, RunRecord(ckpt_dir=root / "checkpoints"))


def worker() -> int:
    import deepspeed
    import torch.distributed as dist

    from gridtrain.train.checkpoint.state import TrainState

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    base = os.environ.get("GRIDTRAIN_BENCH_DIR", tempfile.gettempdir())
    root = Path(dist_broadcast(tempfile.mkdtemp(prefix="gridtrain-bench-ckpt-", dir=base) if rank == 0 else None))
    engine, ckpt = build_engine(), checkpointer(root)
    rows = []
    try:
        for repeat in range(1, REPEATS + 1):
            result = ckpt.save(engine, TrainState(step=repeat))
            started = time.perf_counter()
            ckpt.deleter.wait()  # the retired checkpoint's deletion must not run under the dd write
            deleting = time.perf_counter() - started
            dist.barrier()
            dd_seconds = dd_write(root / "dd.bin", result.bytes) if rank == 0 else 0.0
            dist.barrier()
            rows.append((result.bytes, result.seconds, dd_seconds, deleting))
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if rank == 0:
        report(rows)
    return 0


def dist_broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def report(rows: list[tuple[int, float, float, float]]) -> None:
    print(f"{'run':>4} {'ckpt MB':>9} {'save s (stall)':>15} {'ckpt GB/s':>10} {'dd GB/s':>8} {'ratio':>6} "
          f"{'bg delete s':>12}")
    for i, (nbytes, save_s, dd_s, delete_s) in enumerate(rows, 1):
        print(f"{i:>4} {nbytes / 1e6:>9.1f} {save_s:>15.2f} {nbytes / save_s / 1e9:>10.3f} "
              f"{nbytes / dd_s / 1e9:>8.3f} {dd_s / save_s:>6.2f} {delete_s:>12.3f}")
    # This virtual disk's speed swings several-fold between consecutive writes (0.34 to 2.3 GB/s
    # measured), so each save is compared with the dd write next to it and the headline is the
    # median of those paired ratios; best-of-each pairs unlike moments and is printed for reference.
    best_save = min(r[1] for r in rows)
    best_dd = min(r[2] for r in rows)
    ratios = sorted(dd_s / save_s for _, save_s, dd_s, _ in rows)
    print(f"training stall per save: {best_save:.2f} s (best of {len(rows)}), {NPROC} ranks, ZeRO-2")
    print(f"best save / best dd: {best_dd / best_save:.2f}")
    print(f"checkpoint write throughput / disk sequential write (dd + fdatasync), median of {len(rows)} "
          f"paired runs: {ratios[len(ratios) // 2]:.2f} (target >= 0.50)", flush=True)


if __name__ == "__main__":
    sys.exit(worker() if "RANK" in os.environ else relaunch())
