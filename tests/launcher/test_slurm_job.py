"""`gridtrain slurm-job end`, the batch script's decision after srun, with a fake scontrol that
records its calls: 0 finishes, 75 requeues (array tasks as <array job>_<task>) until the cap,
anything else is a failure that is not requeued. The real cycle runs in tests/slurm."""
import pytest

from gridtrain.launcher.errors import UserError
from gridtrain.launcher.run_config import RunConfig
from gridtrain.launcher.slurm_job import end, job_id


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A fake scontrol on PATH; returns the file its calls go to. `exit N` in tmp_path/rc fails it."""
    calls = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nrc=0\n[ -f {tmp_path}/rc ] && read rc < {tmp_path}/rc\n'
                    'echo "scontrol: error: refused" >&2\nexit $rc\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    return calls


def test_job_id_of_an_array_task_names_the_task():
    assert job_id({"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2"}) == "10_2"
    assert job_id({"SLURM_JOB_ID": "12"}) == "12"
    with pytest.raises(UserError, match="SLURM_JOB_ID is not set"):
        job_id({})


def test_end_requeues_a_stopped_job_until_the_cap(scontrol, tmp_path, capsys):
    cfg, env = RunConfig(), {"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2"}
    assert end(cfg, 0, 3, env) == 0 and not scontrol.exists()
    assert end(cfg, 1, 3, env) == 1 and not scontrol.exists()  # a crash is not requeued
    assert end(cfg, 75, 3, {**env, "SLURM_RESTART_COUNT": "2"}) == 0
    assert scontrol.read_text() == "requeue 10_2\n"
    assert end(cfg, 75, 3, {**env, "SLURM_RESTART_COUNT": "3"}) == 75  # the cap: no call
    assert end(cfg, 75, 0, env) == 75
    assert scontrol.read_text() == "requeue 10_2\n"
    (tmp_path / "rc").write_text("1")
    assert end(cfg, 75, 3, env) == 75  # scontrol refused: the job fails, the checkpoint stays
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "gridtrain: job 10_2: training finished at train.steps=1000",
        "gridtrain: job 10_2: the ranks failed (srun exit status 1); not requeued: see the ranks' output above",
        "gridtrain: job 10_2: stopped with a checkpoint; requeued (restart 3 of at most 3)",
        "gridtrain: job 10_2: stopped with a checkpoint but not requeued: it has been requeued 3 time(s), the cap "
        "(--max-requeues 3); submit again to continue",
        "gridtrain: job 10_2: stopped with a checkpoint but not requeued: it has been requeued 0 time(s), the cap "
        "(--max-requeues 0); submit again to continue",
        "gridtrain: job 10_2: stopped with a checkpoint, but `scontrol requeue 10_2` failed: scontrol: error: refused; "
        "submit again to continue",
    ]
