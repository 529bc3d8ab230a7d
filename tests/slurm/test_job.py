"""The job id `gridtrain slurm-job end` requeues, from the batch job's environment. What `end`
decides runs through the real Slurm daemons in tests/slurm (requeue, cap, array tasks, a crash,
a refused requeue)."""
import pytest

from gridtrain.errors import UserError
from gridtrain.slurm.job import job_id


def test_job_id_of_an_array_task_names_the_task():
    assert job_id({"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2"}) == "10_2"
    assert job_id({"SLURM_JOB_ID": "12"}) == "12"
    with pytest.raises(UserError, match="SLURM_JOB_ID is not set"):
        job_id({})
