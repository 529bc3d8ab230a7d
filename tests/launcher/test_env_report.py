"""`gridtrain env`'s launch rows: the Slurm job it runs in and what rank discovery makes of the
environment (a real `srun gridtrain env` on two nodes runs in tests/slurm)."""
from gridtrain.launcher.env_report import launch_lines


def test_launch_rows_name_the_job_the_rank_source_and_the_master(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # our nodelist parser, not a local scontrol
    env = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2", "SLURM_JOB_NODELIST": "localhost,gpu2",
           "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_PARTITION": "gpu"}
    assert dict(launch_lines(env)) == {
        "slurm job": "4242 (restart 2), nodes localhost,gpu2, 16 tasks, partition gpu",
        "rank discovery": "Slurm (SLURM_PROCID, SLURM_NTASKS): rank 9 of 16, local rank 1, master localhost:24242",
    }
    assert dict(launch_lines({})) == {"slurm job": "none (SLURM_JOB_ID not set)",
                                      "rank discovery": "a single rank (no torchrun, Slurm task or MPI variables)"}
    bad = dict(launch_lines({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}))["rank discovery"]
    assert bad == "error: SLURM_PROCID='x': must be an integer; check how the job was launched"
