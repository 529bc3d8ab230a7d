"""Single-process checks of the checkpoint pieces that need no engine: manifest and verification,
atomic publish, fallback, retention, fresh-start refusal, RNG capture, stop signals, inspect CLI."""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gridtrain.parallel.layout import Layout
from gridtrain.train.checkpoint import manifest as manifest_mod
from gridtrain.train.checkpoint.config import CheckpointConfig
from gridtrain.train.checkpoint.manifest import (
    build_manifest,
    digest_files,
    list_files,
    read_manifest,
    verify_checkpoint,
    write_text_atomic,
)
from gridtrain.train.checkpoint.rng import capture_rng_state, restore_rng_state
from gridtrain.train.checkpoint.state import TrainState
from gridtrain.train.checkpoint.store import (
    BackgroundDeleter,
    CheckpointError,
    find_resumable,
    list_checkpoints,
    publish,
    read_latest,
    remove_stale_temps,
    retention_victims,
    retire,
    temp_path,
)
from gridtrain.train.preemption import PREEMPTED_EXIT_CODE, StopRequest

LAYOUT = {"world_size": 2, "tp": 1, "pp": 1, "dp": 2, "zero_stage": 2, "dtype": "fp32"}


def fake_checkpoint(ckpt_dir: Path, step: int) -> Path:
    """A published checkpoint made by the real publish path, with random shard contents."""
    tmp = temp_path(ckpt_dir, step)
    (tmp / "ds").mkdir(parents=True)
    rng = np.random.default_rng(step)
    for name in ("ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (tmp / name).write_bytes(rng.bytes(50_000))
    state = TrainState(step=step, consumed_samples=8 * step, consumed_tokens=2048 * step)
    (tmp / manifest_mod.STATE_NAME).write_text(json.dumps({"train_state": state.to_dict()}))
    files = digest_files(tmp, list_files(tmp))
    manifest = build_manifest(step, files, LAYOUT, {"torch": torch.__version__})
    write_text_atomic(tmp / manifest_mod.MANIFEST_NAME, json.dumps(manifest))
    return publish(tmp, ckpt_dir, step)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_detects_truncation_loss_and_bit_flips(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 10)
    assert verify_checkpoint(ckpt) == []
    assert read_manifest(ckpt)["total_bytes"] == sum(e["size"] for e in read_manifest(ckpt)["files"].values())
    model = ckpt / "ds" / "mp_rank_00_model_states.pt"
    flip_byte(model)
    problems = verify_checkpoint(ckpt)
    assert len(problems) == 1 and "mp_rank_00_model_states.pt" in problems[0] and "mismatch" in problems[0]
    assert verify_checkpoint(ckpt, checksums=False) == []  # a same-size flip needs the checksum
    optim = ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    os.truncate(optim, 100)
    assert any("truncated" in p and optim.name in p for p in verify_checkpoint(ckpt, checksums=False))
    optim.unlink()
    assert any("missing" in p for p in verify_checkpoint(ckpt))
    (ckpt / "manifest.json").write_text("{not json")
    assert "unreadable" in verify_checkpoint(ckpt)[0]


def test_verification_shares_split_files_between_ranks(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 1)
    flip_byte(ckpt / "ds" / "mp_rank_00_model_states.pt")
    shares = [verify_checkpoint(ckpt, share=(r, 3)) for r in range(3)]
    assert sum(len(s) for s in shares) == 1  # each file checked by exactly one share


def test_publish_moves_latest_and_temps_are_never_candidates(tmp_path):
    for step in (5, 10):
        fake_checkpoint(tmp_path, step)
    assert read_latest(tmp_path) == "step_00000010"
    crashed = temp_path(tmp_path, 15)
    crashed.mkdir()
    (crashed / "half.pt").write_bytes(b"x")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10]
    assert find_resumable(tmp_path).name == "step_00000010"
    assert remove_stale_temps(tmp_path) == [crashed] and not crashed.exists()
    fake_checkpoint(tmp_path, 10)  # republishing a step replaces it in one rename
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10] and verify_checkpoint(tmp_path / "step_00000010") == []


def test_atomic_write_keeps_old_content_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    write_text_atomic(target, "old")

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manifest_mod.os, "replace", crash)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_fallback_warns_with_file_name_then_errors_when_none_valid(tmp_path, capsys):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    os.truncate(tmp_path / "step_00000003" / "ds" / "mp_rank_00_model_states.pt", 10)
    assert find_resumable(tmp_path).name == "step_00000002"
    assert "step_00000003/ds/mp_rank_00_model_states.pt" in capsys.readouterr().err
    flip_byte(tmp_path / "step_00000002" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tmp_path / "step_00000001" / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as err:
        find_resumable(tmp_path)
    assert "none of its 3 checkpoints is valid" in str(err.value) and "--no-resume" in str(err.value)
    assert find_resumable(tmp_path / "empty") is None


def test_shard_hashed_while_written_matches_its_bytes(tmp_path, monkeypatch):
    """The save path's sink (sha256 while torch.save writes, large blocks hashed on a thread,
    interim fdatasyncs) must produce exactly the file's checksum; a flipped byte must not match."""
    from concurrent.futures import ThreadPoolExecutor

    from gridtrain.train.checkpoint import save as checkpoint_save
    from gridtrain.train.checkpoint.manifest import file_digest

    shard = {"big": torch.randn(3, 2**20), "small": torch.arange(10), "step": 7}  # 12 MB: offloaded blocks
    path = tmp_path / "shard.pt"
    monkeypatch.setattr(checkpoint_save, "_FLUSH_EVERY", 2**20)
    with ThreadPoolExecutor(1) as hash_pool, ThreadPoolExecutor(1) as fsync_pool:
        with open(path, "wb") as raw:
            sink = checkpoint_save._FlushingSink(raw, hash_pool, fsync_pool)
            torch.save(shard, sink)
            sink.settle()
    assert (sink.size, sink.hexdigest()) == file_digest(path) and sink.size == path.stat().st_size
    assert torch.equal(torch.load(path)["big"], shard["big"])
    flip_byte(path)
    assert file_digest(path)[1] != sink.hexdigest()


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    assert retention_victims([1, 2, 3, 4, 5], keep_last=2, keep_every=0) == [1, 2, 3]
    assert retention_victims([10, 20, 30, 40, 50], keep_last=2, keep_every=20) == [10, 30]
    assert retention_victims([1, 2, 3], keep_last=0, keep_every=0) == []
    for step in (10, 20, 30, 40, 50):
        fake_checkpoint(tmp_path, step)
    deleter = BackgroundDeleter()  # what a save does: retire, then delete on the deleter's thread
    retired = retire(tmp_path, keep_last=2, keep_every=20)
    deleter.delete(retired)
    deleter.wait()
    deleted = [p.with_name(p.name.removeprefix(".tmp-deleting-")) for p in retired]
    assert [p.name for p in deleted] == ["step_00000010", "step_00000030"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 40, 50]
    assert not list(tmp_path.glob(".tmp-*"))


def test_retired_checkpoints_leave_the_published_set_at_once_and_are_deleted_in_the_background(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    deleter = BackgroundDeleter()
    doomed = retire(tmp_path, keep_last=1, keep_every=0)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]  # before any deletion ran
    assert [p.name for p in doomed] == [".tmp-deleting-step_00000001", ".tmp-deleting-step_00000002"]
    deleter.delete(doomed)
    deleter.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]
    assert verify_checkpoint(tmp_path / "step_00000003") == []


ONE_RANK = Layout(tp=1, pp=1, dp=1, zero_stage=0, micro_batch_size=1, global_batch_size=1)


def test_a_failed_deletion_is_reported_once_naming_the_folder(tmp_path, monkeypatch, capsys):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    doomed = retire(tmp_path, keep_last=1, keep_every=0)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "unlink", refuse)  # every file of the retired folders resists deletion
    deleter = BackgroundDeleter()
    deleter.delete(doomed)
    deleter.wait()
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("warning: could not delete the retired checkpoint") == 2  # once per folder
    assert all(f"{path} (" in err for path in doomed) and "Permission denied" in err and "more" in err
    assert all(path.exists() for path in doomed)  # left behind, and said so
    deleter.delete(doomed)  # negative control: without the failure, silent and gone
    deleter.wait()
    assert capsys.readouterr().err == "" and not any(path.exists() for path in doomed)


def checkpointer_for(tmp_path: Path, cfg: CheckpointConfig):
    from gridtrain.train.checkpoint.checkpointer import Checkpointer, RunRecord
    from gridtrain.train.checkpoint.store import checkpoint_dir

    return Checkpointer(cfg, ONE_RANK, RunRecord(ckpt_dir=checkpoint_dir(cfg, str(tmp_path))))


def test_fresh_start_refuses_existing_checkpoints_unless_overwrite(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints", 7)
    with pytest.raises(CheckpointError, match="checkpoint.overwrite=true"):
        checkpointer_for(tmp_path, CheckpointConfig(overwrite=False)).resume(None, "none")
    assert checkpointer_for(tmp_path, CheckpointConfig(overwrite=True)).resume(None, "none") is None
    moved = list(tmp_path.glob("checkpoints.replaced-*"))
    assert len(moved) == 1 and verify_checkpoint(moved[0] / "step_00000007") == []  # nothing lost
    assert checkpointer_for(tmp_path, CheckpointConfig(overwrite=False)).resume(None, "auto") is None


def test_rng_state_roundtrip_including_megatron_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.set_states({"model-parallel-rng": torch.arange(16, dtype=torch.uint8)})
    saved = capture_rng_state()
    draws = lambda: (random.random(), float(np.random.rand()), float(torch.rand(1)))  # noqa: E731
    first = draws()
    tracker.set_states({"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)})
    assert draws() != first  # negative control: the streams moved on
    restore_rng_state(saved)
    assert draws() == first
    assert torch.equal(tracker.get_states()["model-parallel-rng"], torch.arange(16, dtype=torch.uint8))
    tracker.reset()


def test_stop_request_real_signals_and_handler_restore():
    before = signal.getsignal(signal.SIGUSR1)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        with StopRequest() as stop:
            assert not stop.should_stop()
            os.kill(os.getpid(), signum)
            assert stop.should_stop() and stop.received == signum
    assert signal.getsignal(signal.SIGUSR1) == before
    assert PREEMPTED_EXIT_CODE not in (0, 1, 2) and PREEMPTED_EXIT_CODE < 128


def test_train_state_json_roundtrip_ignores_unknown_keys():
    state = TrainState(step=3, consumed_samples=96, consumed_tokens=4096, lr=1e-4, metrics={"best": 2.5})
    data = json.loads(state.to_json())
    assert TrainState.from_dict({**data, "future_field": 1}) == state
    assert dataclasses.replace(state, step=4) != state


def test_inspect_cli_reports_and_imports_no_torch(tmp_path):
    for step in (4, 8):
        fake_checkpoint(tmp_path, step)
    flip_byte(tmp_path / "step_00000004" / "ds" / "mp_rank_00_model_states.pt")
    code = ("import sys; from gridtrain.launcher.cli import build_parser; from gridtrain.launcher import checkpoint_commands as c;"
            f" rc = c.inspect_command(build_parser().parse_args(['checkpoint', 'inspect', {str(tmp_path)!r}]));"
            " print('TORCH', 'torch' in sys.modules, 'RC', rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    out = proc.stdout
    assert "step_00000008  (latest)" in out and "step 8 | consumed samples 64" in out
    assert "TP 1 x PP 1 x DP 2, ZeRO 2" in out and "valid (sha256 of 3 files checked)" in out
    assert "INVALID: " in out and "mp_rank_00_model_states.pt: sha256 mismatch" in out
    assert "TORCH False RC 1" in out, proc.stderr
    missing = subprocess.run([sys.executable, "-m", "gridtrain.launcher.cli", "checkpoint", "inspect",
                              str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_time_interval_makes_a_save_due(tmp_path):
    ckpt = checkpointer_for(tmp_path, CheckpointConfig(interval_steps=0, interval_minutes=1.0))
    assert not ckpt._due(7)
    ckpt._last_save_time -= 61  # as if the last save were 61 s ago
    assert ckpt._due(7)
    steps_only = checkpointer_for(tmp_path, CheckpointConfig(interval_steps=5))
    assert [s for s in range(1, 16) if steps_only._due(s)] == [5, 10, 15]
