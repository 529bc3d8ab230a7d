"""What can be checked of the GPU check without a GPU: its one-line refusal, and that the wheel
bundle `make gpu-wheels` writes holds a CPython 3.12 / x86-64 Linux wheel of every package the
check imports that an air-gapped GPU node lacks (each wheel's tags and metadata read)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_wheels import verify  # noqa: E402


def test_refuses_without_cuda_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu-check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU node"]


def test_gpu_wheels_bundle_is_complete_for_cp312(tmp_path):
    out = tmp_path / "wheels"
    proc = subprocess.run(["make", "-s", "gpu-wheels", f"GPU_WHEELS={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in out.glob("*.whl"))
    assert verify(out) == [], names
    for package in ("deepspeed-0.19.8-py3-none-any", "megatron_core-0.16.1-cp312", "gridtrain-", "pydantic_core-"):
        assert any(name.startswith(package) for name in names), (package, names)
    assert sum(p.stat().st_size for p in out.glob("*.whl")) < 50e6  # tens of MB at most
    # Negative controls: a missing dependency, and a wheel for another Python, are both reported.
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    next(partial.glob("hjson-*.whl")).unlink()
    assert any(p.startswith("hjson (needed by deepspeed)") for p in verify(partial))
    core = next(partial.glob("pydantic_core-*.whl"))
    core.rename(core.with_name(core.name.replace("cp312-cp312", "cp311-cp311")))
    assert any("not installable on CPython 3.12" in p for p in verify(partial))
