"""`gridtrain train --max-restarts N`: a rank killed with SIGKILL mid-run makes the launcher stop
the others and start every rank again from the newest checkpoint; the run finishes with each step's
loss equal, bit for bit, to an uninterrupted run's, and no step before that checkpoint is trained
again. A rank killed again before any new checkpoint ends the run with one line naming it, even
with restarts left. The cap itself is the pure policy's, checked without launches."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_config import sections, write_yaml

from gridtrain.train.restarts import Attempt, refusal

psutil = pytest.importorskip("psutil")

GRIDTRAIN = [sys.executable, "-m", "gridtrain.launcher.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
STEPS = 30


def write_config(tmp_path: Path, data: dict, name: str, interval: int) -> tuple[Path, Path]:
    """DP=2 (ZeRO-1) on 2 ranks, checkpoints every `interval` steps."""
    run_dir = tmp_path / name
    config = sections(data, run_dir, train={"steps": STEPS}, checkpoint={"interval_steps": interval})
    return write_yaml(tmp_path / f"{name}.yaml", config), run_dir


def start(config: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([*GRIDTRAIN, "train", str(config), "--nproc-per-node", "2", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"kind": "train"' in line]


def wait_until(launcher: subprocess.Popen, predicate, what: str, seconds: float = 180):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if launcher.poll() is not None:
            break
        time.sleep(0.02)
    launcher.kill()
    raise AssertionError(f"gave up waiting for {what}:\n{launcher.communicate()[1][-3000:]}")


def rank_process(launcher: subprocess.Popen, rank: int, not_pid: int | None = None):
    """The worker running global rank `rank` (its RANK variable), other than pid `not_pid`."""
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "launch" in proc.cmdline() and proc.environ().get("RANK") == str(rank) and proc.pid != not_pid:
                return proc
        except psutil.NoSuchProcess:
            continue
    return None


def test_the_restart_policy_counts_and_refuses():
    first, second = Attempt(restarts=0, started_at=0), Attempt(restarts=1, started_at=10)
    assert refusal(first, 1, 10, 1, "--max-restarts") is None
    assert refusal(first, 1, 0, 1, "--max-restarts") is None  # a first failure restarts even from scratch
    assert refusal(second, 1, 20, 2, "--max-restarts") is None  # progress since restart 1: go on
    assert refusal(second, 1, 20, 1, "--max-restarts") == (
        "not restarted: 1 restart(s) used, the cap (--max-restarts 1); run the same command to resume from step 20")
    assert refusal(second, 1, 10, 5, "--max-restarts").startswith(
        "not restarted: the failure came again before any new checkpoint (still step 10, as when restart 1 began)")
    assert refusal(first, 2, 10, 5, "--max-restarts").startswith("not restarted: a rank reported bad input (exit 2)")
    assert refusal(first, 1, 10, 0, "--max-restarts") == (
        "not restarted (--max-restarts 0); run the same command to resume from step 10")


def test_a_killed_rank_is_restarted_in_place_and_the_run_equals_an_uninterrupted_one(tmp_path, sentences_corpus):
    config, ref_dir = write_config(tmp_path, sentences_corpus, "reference", interval=5)
    reference = subprocess.run([*GRIDTRAIN, "train", str(config), "--nproc-per-node", "2"], capture_output=True,
                               text=True, env=ENV, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    config, run_dir = write_config(tmp_path, sentences_corpus, "restarted", interval=5)
    launcher = start(config, "--max-restarts", "1")
    try:
        wait_until(launcher, lambda: len(train_records(run_dir)) >= 12, "step 12")
        victim = rank_process(launcher, 1)
        victim.send_signal(signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stderr[-3000:]
    # One line naming the killed rank (rank 0, torn down on its dead peer, may be named as well).
    match = re.search(rf"^gridtrain: .*rank 1 \(local rank 1, pid {victim.pid}\) failed: killed by SIGKILL.*; "
                      r"restart 1 of at most 1: every rank starts again from the newest checkpoint \(step (\d+)\)$",
                      stderr, re.M)
    assert match, stderr[-3000:]
    restarted_from = int(match.group(1))
    steps = [r["step"] for r in train_records(run_dir)]
    killed_at = len(steps) - (STEPS - restarted_from)  # the last step logged before the kill
    assert killed_at >= 12 and restarted_from >= 10 and restarted_from % 5 == 0, steps
    # Every step up to the checkpoint once; the steps after it, lost with the kill, trained again.
    assert steps == list(range(1, killed_at + 1)) + list(range(restarted_from + 1, STEPS + 1))
    ours = {r["step"]: r for r in train_records(run_dir)}  # a step trained again: its last record
    theirs = {r["step"]: r for r in train_records(ref_dir)}
    assert [(ours[s]["loss"], ours[s]["grad_norm"], ours[s]["consumed_samples"]) for s in theirs] == [
        (theirs[s]["loss"], theirs[s]["grad_norm"], theirs[s]["consumed_samples"]) for s in theirs]
    assert len({r["loss"] for r in theirs.values()}) == STEPS  # the losses move: equal means something


def test_a_rank_killed_again_before_a_new_checkpoint_ends_the_run(tmp_path, sentences_corpus):
    config, run_dir = write_config(tmp_path, sentences_corpus, "repeated", interval=10)
    launcher = start(config, "--max-restarts", "3")
    try:
        wait_until(launcher, lambda: len(train_records(run_dir)) >= 12, "step 12")
        first = rank_process(launcher, 1)
        first.send_signal(signal.SIGKILL)
        # Killed again as soon as the restarted rank exists: the same step, no new checkpoint.
        again = wait_until(launcher, lambda: rank_process(launcher, 1, not_pid=first.pid), "the restarted rank 1")
        again.send_signal(signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, stderr[-3000:]
    assert "restart 1 of at most 3: every rank starts again from the newest checkpoint (step 10)" in stderr
    last = stderr.splitlines()[-1]
    assert last.startswith("gridtrain: error: ") and f"rank 1 (local rank 1, pid {again.pid}) failed: killed by SIGKILL" in last
    assert last.endswith(
        "; not restarted: the failure came again before any new checkpoint (still step 10, as when restart 1 began), so "
        "another restart would repeat it; fix the cause, then run the same command to resume")
