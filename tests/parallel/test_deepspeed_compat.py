"""The supported DeepSpeed version is one fact: pyproject pins it, start-up checks it."""
import re
import subprocess
import sys
from pathlib import Path

from gridtrain.parallel.deepspeed_compat import SUPPORTED_DEEPSPEED, check_deepspeed_version, version_problem

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_pins_the_version_the_check_accepts():
    pins = re.findall(r'"deepspeed==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [SUPPORTED_DEEPSPEED]
    assert f"deepspeed=={SUPPORTED_DEEPSPEED}" in (ROOT / "requirements.txt").read_text()


def test_an_untested_version_is_refused_with_one_line():
    check_deepspeed_version()  # the installed one passes
    assert version_problem(SUPPORTED_DEEPSPEED) is None
    message = version_problem("0.17.1")
    assert message == (f"deepspeed 0.17.1 is installed; gridtrain supports deepspeed {SUPPORTED_DEEPSPEED} only "
                       "(its uses of DeepSpeed internals were checked against it): "
                       f"pip install deepspeed=={SUPPORTED_DEEPSPEED}")
    assert version_problem(None).startswith("deepspeed is not installed;")


def test_the_check_imports_no_deepspeed():
    code = ("import sys; from gridtrain.parallel.deepspeed_compat import check_deepspeed_version; "
            "check_deepspeed_version(); print('deepspeed' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_a_build_lock_no_process_holds_is_removed_in_one_line(tmp_path):
    """torch's FileBaton lock left by a killed start-up: removed (after a second look) with one line,
    where before every later run waited on it forever without a word."""
    from gridtrain.parallel.deepspeed_compat import wait_for_build_lock

    lock = tmp_path / "lock"
    lock.write_bytes(b"")
    said = []
    wait_for_build_lock(lock, said.append)
    assert not lock.exists() and said == [
        f"removed {lock}: a build lock no living process holds, left by a start-up that was interrupted"]


def test_a_build_lock_held_by_a_living_process_is_waited_for_and_named(tmp_path):
    """The control: a process building the op holds the lock open; the waiter says which process it
    waits for (after the quiet period) and goes on once that process releases it, removing nothing."""
    import subprocess as sp

    from gridtrain.parallel.deepspeed_compat import wait_for_build_lock

    lock = tmp_path / "lock"
    holder = sp.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); "
                       "print('held', flush=True); time.sleep(3); os.close(fd); os.remove(sys.argv[1])", str(lock)],
                      stdout=sp.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said = []
    wait_for_build_lock(lock, said.append, quiet_s=0.5)
    holder.wait(timeout=30)
    assert holder.returncode == 0  # it removed its own lock: nobody removed it under it
    assert said == [f"waiting for process {holder.pid}, which holds {lock} (building or loading DeepSpeed's CPU "
                    "communication op)"]


def test_a_one_rank_world_never_loads_the_op():
    """Generation, conversion and one-rank runs tell DeepSpeed the op is unavailable instead of
    building or waiting for it; a world of 2 loads it (built when `make` set up the environment)."""
    code = ("import sys, deepspeed.ops as ops; from gridtrain.parallel.deepspeed_compat import prepare_shm_comm_op; "
            "said = []; prepare_shm_comm_op(1, said.append); "
            "print(ops.__compatible_ops__['deepspeed_shm_comm'], said)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[-2] == "False []", out.stdout + out.stderr
