"""Worker for test_checkpoint_ds.py: real DeepSpeed engines (ZeRO or pipeline) on gloo ranks, saved
and resumed through gridtrain's Checkpointer. Prints one JSON line per rank ("RESULT {...}") that
the test checks; any failed expectation raises and fails the launch.

    ds_checkpoint.py zero STAGE WORKDIR [TMPFS_DIR]    DP over all ranks, ZeRO STAGE
    ds_checkpoint.py pipe WORKDIR                      PipelineModule over all ranks, ZeRO-1
"""
import gc
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from gridtrain.parallel import groups
from gridtrain.parallel.layout import Layout
from gridtrain.train.checkpoint.checkpointer import Checkpointer, RunRecord
from gridtrain.train.checkpoint.config import CheckpointConfig
from gridtrain.train.checkpoint.manifest import verify_checkpoint
from gridtrain.train.checkpoint.state import TrainState
from gridtrain.train.checkpoint.store import CheckpointError, read_latest
from gridtrain.train.preemption import StopRequest

MICRO, IN, OUT = 4, 16, 4


def layers():
    # Dropout makes the RNG state part of what must be restored for identical losses.
    return [nn.Linear(IN, 64), nn.Tanh(), nn.Dropout(0.2), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, OUT)]


def ds_config(zero: int, gas: int = 1) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
            "zero_optimization": {"stage": zero}, "gradient_clipping": 1.0,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def build(mode: str, zero: int, seed: int):
    torch.manual_seed(seed)
    if mode == "pipe":
        from deepspeed.pipe import PipelineModule

        model = PipelineModule(layers=layers(), num_stages=dist.get_world_size(), loss_fn=nn.MSELoss(),
                               partition_method="uniform")
        config = ds_config(zero, gas=2)
    else:
        model = nn.Sequential(*layers())
        config = ds_config(zero)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def batch(step: int, index: int):
    gen = torch.Generator().manual_seed(1000 * step + index)
    return torch.randn(MICRO, IN, generator=gen), torch.randn(MICRO, OUT, generator=gen)


def train(engine, mode: str, first: int, last: int) -> list[float]:
    """Steps first..last; the loss of each as a Python float (bit-exact comparison)."""
    losses = []
    for step in range(first, last + 1):
        if mode == "pipe":
            loss = engine.train_batch(iter([batch(step, 0), batch(step, 1)]))
        else:
            x, y = batch(step, dist.get_rank())
            loss = nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
        losses.append(float(loss.item()) if loss is not None else float("nan"))
    return losses


def checkpointer(mode: str, zero: int, ckpt_dir: Path, keep_last: int = 5, async_save: bool = False) -> Checkpointer:
    world = dist.get_world_size()
    pp = world if mode == "pipe" else 1
    gas = 2 if mode == "pipe" else 1
    layout = Layout(tp=1, pp=pp, dp=world // pp, zero_stage=zero, micro_batch_size=MICRO,
                    global_batch_size=MICRO * gas * (world // pp))
    return Checkpointer(CheckpointConfig(keep_last=keep_last, interval_steps=3, async_save=async_save), layout,
                        RunRecord(ckpt_dir=ckpt_dir))


def state_at(step: int) -> TrainState:
    return TrainState(step=step, consumed_samples=step * MICRO * dist.get_world_size(), metrics={"best": 1.0 / step})


def check_exact_resume(mode: str, zero: int, ckpt_dir: Path) -> dict:
    """Uninterrupted steps 1..6 with saves at 3 and 6 vs a differently initialised engine resumed
    at step 3 (RNG scrambled before); negative control: the same engine without resuming."""
    ref = build(mode, zero, seed=1)
    ckpt = checkpointer(mode, zero, ckpt_dir)
    before = train(ref, mode, 1, 3)
    ckpt.maybe_save(ref, state_at(3), force=True)
    reference = train(ref, mode, 4, 6)
    ckpt.maybe_save(ref, state_at(6), force=True)
    fresh = build(mode, zero, seed=2)
    torch.manual_seed(999)
    state = checkpointer(mode, zero, ckpt_dir).resume(fresh)  # newest: step 6
    assert state.step == 6 and state.consumed_samples == state_at(6).consumed_samples, state
    resumed3 = build(mode, zero, seed=2)
    torch.manual_seed(999)
    state3 = checkpointer(mode, zero, ckpt_dir).resume(resumed3, str(ckpt_dir / "step_00000003"))
    assert state3 == state_at(3), state3
    resumed = train(resumed3, mode, 4, 6)
    control = train(build(mode, zero, seed=2), mode, 4, 6)
    assert resumed == reference, (resumed, reference)
    assert control != reference, "negative control: an unrestored engine must give other losses"
    return {"before": before, "reference": reference, "resumed": resumed, "control": control}


def check_corruption(mode: str, zero: int, ckpt_dir: Path) -> dict:
    """Truncate a ZeRO shard of the newest checkpoint: resume falls back to step 3; then corrupt
    step 3 too (same size, flipped bytes): a clear error."""
    newest = ckpt_dir / "step_00000006"
    victims = sorted(p for p in (newest / "ds").rglob("*.pt"))
    victim = victims[-1]
    if dist.get_rank() == 0:
        with open(victim, "r+b") as fh:
            fh.truncate(victim.stat().st_size // 2)
    dist.barrier()
    state = checkpointer(mode, zero, ckpt_dir).resume(build(mode, zero, seed=3))
    assert state.step == 3, state
    older = sorted((ckpt_dir / "step_00000003" / "ds").rglob("*.pt"))[0]
    if dist.get_rank() == 0:
        with open(older, "r+b") as fh:
            fh.seek(older.stat().st_size // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    try:
        checkpointer(mode, zero, ckpt_dir).resume(build(mode, zero, seed=3))
    except CheckpointError as exc:
        message = str(exc)
    else:
        raise AssertionError("resume with no valid checkpoint must raise CheckpointError")
    assert older.name in message and "mismatch" in message, message
    return {"truncated": victim.name, "flipped": older.name, "error": message}


def check_disk_full(mode: str, zero: int, small: Path, background: bool) -> dict:
    """On a small tmpfs: save step 3, fill the disk to leave half a checkpoint free, save step 6
    (`background`: an interval save written in the background, failing there and reported when it
    is finished): every rank gets a CheckpointError, nothing is published, step 3 verifies and
    resumes exactly."""
    ckpt_dir = small / ("async" if background else "sync") / "checkpoints"
    ref = build(mode, zero, seed=1)
    ckpt = checkpointer(mode, zero, ckpt_dir, keep_last=1, async_save=background)
    train(ref, mode, 1, 3)
    first, = ckpt.maybe_save(ref, state_at(3), force=True)
    reference = train(ref, mode, 4, 6)
    ballast = small / "ballast"
    if dist.get_rank() == 0:
        free = shutil.disk_usage(small).free
        with open(ballast, "wb") as fh:
            fh.write(b"\0" * max(0, free - first.bytes // 2))
    dist.barrier()
    try:
        if background:
            assert ckpt.maybe_save(ref, state_at(6)) == []  # started, not published
            ckpt.close()
        else:
            ckpt.maybe_save(ref, state_at(6), force=True)
    except CheckpointError as exc:
        message = str(exc)
    else:
        raise AssertionError("a save onto a full disk must raise CheckpointError")
    dist.barrier()
    leftovers = sorted(p.name for p in ckpt_dir.iterdir())
    assert leftovers == ["latest", "step_00000003"], leftovers
    assert read_latest(ckpt_dir) == "step_00000003"
    assert verify_checkpoint(ckpt_dir / "step_00000003") == []
    if dist.get_rank() == 0:
        ballast.unlink()
    dist.barrier()
    fresh = build(mode, zero, seed=2)
    assert checkpointer(mode, zero, ckpt_dir).resume(fresh).step == 3
    resumed = train(fresh, mode, 4, 6)
    assert resumed == reference, (resumed, reference)
    key = "async_disk_full_error" if background else "disk_full_error"
    return {key: message, "ckpt_bytes": first.bytes}


def check_stop_agreement() -> dict:
    """A signal reaching only rank 1 at iteration 2 stops every rank at iteration 2."""
    stopped_at = None
    with StopRequest() as stop:
        for iteration in range(6):
            if iteration == 2 and dist.get_rank() == dist.get_world_size() - 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            if stop.should_stop():
                stopped_at = iteration
                break
    agreed = [None] * dist.get_world_size()
    dist.all_gather_object(agreed, stopped_at)
    assert agreed == [2] * dist.get_world_size(), agreed
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    return {"stopped_at": agreed}


def main() -> None:
    mode = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    if mode == "zero":
        zero, work = int(sys.argv[2]), Path(sys.argv[3])
        small = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    else:
        zero, work, small = 1, Path(sys.argv[2]), None
    result = {"rank": dist.get_rank(), **check_exact_resume(mode, zero, work / "checkpoints")}
    result.update(check_corruption(mode, zero, work / "checkpoints"))
    if small is not None:
        result.update(check_disk_full(mode, zero, small, background=False))
        result.update(check_disk_full(mode, zero, small, background=True))
        result.update(check_stop_agreement())
    print("RESULT " + json.dumps(result), flush=True)
    # This worker leaves a dozen ZeRO engines behind. Collected at interpreter exit, one's gloo
    # all-gather work could be freed by gloo's thread after Python stopped handing out the GIL:
    # "terminate called without an active exception" (SIGABRT) in ~1 of 10 runs (gdb: decref in
    # ~AsyncAllgatherWork from ProcessGroupGloo::runLoop during Py_FinalizeEx). Free them while the
    # interpreter is alive, then let every rank's gloo threads drain, then shut the groups down.
    gc.collect()
    dist.barrier()
    groups.destroy()


if __name__ == "__main__":
    main()
