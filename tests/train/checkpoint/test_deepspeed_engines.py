"""Checkpoints of real DeepSpeed engines on 2 gloo ranks: exact resume (bit-identical losses, with
a negative control), corruption fallback naming the bad file, a full disk (small tmpfs) leaving the
previous checkpoint intact, and stop-signal agreement. The expectations are asserted inside the
worker (tests/train/checkpoint/workers/ds_checkpoint.py); here we check its report."""
import json
import subprocess
import tempfile
from pathlib import Path

import pytest
from multirank import launch

WORKER = Path(__file__).parent / "workers" / "ds_checkpoint.py"


def results(proc) -> list[dict]:
    # Ranks share one stdout pipe, so two RESULT lines may land on one physical line.
    decoder = json.JSONDecoder()
    found = [decoder.raw_decode(part)[0] for part in proc.stdout.split("RESULT ")[1:]]
    return sorted(found, key=lambda r: r["rank"])


@pytest.fixture
def small_tmpfs():
    """A 64 MiB tmpfs, so a save can run out of space without touching the real disk."""
    mount_dir = Path(tempfile.mkdtemp(prefix="gridtrain-tmpfs-"))
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        mount_dir.rmdir()
        pytest.skip(f"cannot mount a tmpfs for the disk-full test (needs root): {proc.stderr.strip()}")
    try:
        yield mount_dir
    finally:
        subprocess.run(["umount", str(mount_dir)], check=True)
        mount_dir.rmdir()


def check_common(proc, reports: list[dict]) -> None:
    assert len(reports) == 2
    for report in reports:
        assert report["resumed"] == report["reference"]
        assert report["control"] != report["reference"]
    assert "falling back to an older one" in proc.stderr
    assert reports[0]["truncated"] in proc.stderr  # the warning names the bad file


def test_zero2_dp2_resume_corruption_disk_full_signals(tmp_path, small_tmpfs):
    proc = launch(WORKER, 2, ["zero", 2, tmp_path, small_tmpfs], timeout=240)
    reports = results(proc)
    check_common(proc, reports)
    for report in reports:
        for key in ("disk_full_error", "async_disk_full_error"):
            assert "disk full" in report[key] and "step_00000003 is intact" in report[key], report[key]
        assert report["stopped_at"] == [2, 2]


def test_zero3_dp2_resume_and_corruption(tmp_path):
    proc = launch(WORKER, 2, ["zero", 3, tmp_path], timeout=240)
    check_common(proc, results(proc))


def test_pipeline_pp2_resume_and_corruption(tmp_path):
    """PipelineModule writes per-layer files (layer_XX-model_states.pt) through the same engine."""
    proc = launch(WORKER, 2, ["pipe", tmp_path], timeout=240)
    check_common(proc, results(proc))
    names = {p.name for p in (tmp_path / "checkpoints" / "step_00000006" / "ds").iterdir()}
    assert {"layer_00-model_states.pt", "layer_05-model_states.pt"} <= names
