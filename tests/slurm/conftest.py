import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # slurm_cluster.py, by plain name as tests/ helpers are
from slurm_cluster import SlurmUnavailable, start_cluster  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd n1, n2 for the session (see slurm_cluster.py); skipped, saying
    why, only where Slurm cannot be installed or started."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as exc:
        pytest.skip(f"no Slurm cluster: {exc}")
    yield cluster
    cluster.stop()
