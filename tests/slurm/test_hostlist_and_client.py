"""Slurm hostlists expanded without Slurm, the fallback when scontrol is missing, and Slurm client
commands run with the job's preemption signals blocked. The parser against Slurm's own, and NodeAddr
lookups, run through the real daemons in test_slurm_jobs.py."""
import re
import signal
import subprocess

import pytest

from gridtrain.errors import UserError
from gridtrain.slurm.client import run_shielded
from gridtrain.slurm.hostlist import expand_nodelist
from gridtrain.slurm.master import first_host


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu7", ["gpu7"]),
    ("a1,b[8-10]", ["a1", "b8", "b9", "b10"]),
    ("rack[1-2]-n[09-10]", ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10"]),
    ("gpu-[1,3]-ib,login", ["gpu-1-ib", "gpu-3-ib", "login"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_bad_nodelist_is_a_user_error():
    with pytest.raises(UserError, match=r"^SLURM_JOB_NODELIST: 'node\[a-b\]' is not a Slurm hostlist \(cannot read the range 'a-b'\)"):
        expand_nodelist("node[a-b]")


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_host("node[07-09]") == "node07"


def test_slurm_queries_run_with_the_preemption_signals_blocked():
    """What the child of run_shielded has blocked (SigBlk of /proc/self/status: bit N-1 for signal
    N), while this process gets its mask back; a plain child (the control) blocks neither."""
    def blocked(result) -> set:
        mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", result.stdout, re.M).group(1), 16)
        return {sig for sig in (signal.SIGUSR1, signal.SIGTERM) if mask & (1 << (sig - 1))}

    status = ["cat", "/proc/self/status"]
    assert blocked(run_shielded(status, timeout=10)) == {signal.SIGUSR1, signal.SIGTERM}
    assert not {signal.SIGUSR1, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert blocked(subprocess.run(status, capture_output=True, text=True)) == set()
