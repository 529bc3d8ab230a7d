"""Rank discovery: the variable mapping of torchrun / Open MPI / MPICH / Slurm, and a real
`mpiexec -n 2` run that forms a gloo group from the discovered variables. Slurm's own parts
(hostlists, NodeAddr lookups) are tested in tests/slurm."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gridtrain.errors import UserError
from gridtrain.launcher.rank_env import RankEnv, resolve


def test_torchrun_variables_pass_through():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve(env) == RankEnv("torchrun", 3, 4, 1, "h0", 1234)


def test_slurm_variables_map_onto_torch_ones(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # use our parser, not a local scontrol
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "localhost,gpu[13-15]", "SLURM_JOB_ID": "123456"}
    assert resolve(env) == RankEnv("slurm", 5, 6, 1, "localhost", 20000 + 123456 % 20000)
    assert resolve({**env, "MASTER_ADDR": "x", "MASTER_PORT": "99"}) == RankEnv("slurm", 5, 6, 1, "x", 99)
    # A first node that does not resolve, with no Slurm to ask for its NodeAddr: one line, not a
    # rank retrying an unknown host for the store's connect timeout.
    with pytest.raises(UserError, match=r"^SLURM_JOB_NODELIST: the first node 'gpu12' does not resolve as a host "
                                        r"name and scontrol is not on PATH; set MASTER_ADDR to an address"):
        resolve({**env, "SLURM_JOB_NODELIST": "gpu[12-15]"})


def test_mpi_variables_win_over_inherited_slurm_ones():
    slurm_batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "MASTER_ADDR": "h0", "MASTER_PORT": "2000"}
    ompi = {"OMPI_COMM_WORLD_RANK": "7", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    mpich = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}
    assert resolve({**slurm_batch, **ompi}) == RankEnv("mpi", 7, 16, 3, "h0", 2000)
    assert resolve({**slurm_batch, **mpich}) == RankEnv("mpi", 2, 4, 0, "h0", 2000)


def test_no_launcher_is_a_single_rank():
    found = resolve({})
    assert (found.source, found.rank, found.world_size, found.local_rank) == ("single", 0, 1, 0)


def test_non_integer_variable_is_a_user_error():
    with pytest.raises(UserError, match="SLURM_PROCID='x': must be an integer"):
        resolve({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})


def test_real_mpiexec_two_ranks_form_a_gloo_group():
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to the venv's python (pip install 'gridtrain[mpi]')")
    worker = Path(__file__).parent / "workers" / "mpi_discover.py"
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(worker)], capture_output=True, text=True,
                          timeout=120, env={**clean, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Both ranks print through mpiexec's shared stdout, where their lines can run together.
    rows = sorted((json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", proc.stdout)), key=lambda r: r["rank"])
    assert [(r["source"], r["rank"], r["world"], r["local"], r["torch_rank"], r["torch_world"]) for r in rows] == [
        ("mpi", 0, 2, 0, 0, 2), ("mpi", 1, 2, 1, 1, 2)]
    assert rows[0]["addr"] == rows[1]["addr"] and rows[0]["port"] == rows[1]["port"]  # broadcast by rank 0
    assert rows[0]["sum"] == rows[1]["sum"] == 1.0
