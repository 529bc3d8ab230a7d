"""set_rank_environment in a rank that srun or mpirun started: the library notices gridtrain hides
under torchrun (through PYTHONWARNINGS, read by each worker at start-up) are hidden in the rank's
own process as well, and other warnings still show (the negative control)."""
import os
import subprocess
import sys

CODE = """
import warnings
from gridtrain.launcher.spawn import set_rank_environment
set_rank_environment("cpu")
warnings.warn("Transformer Engine and Apex are not installed. Falling back", UserWarning)
warnings.warn("old API", FutureWarning)
warnings.warn("a warning the user should see", UserWarning)
"""


def test_rank_started_by_srun_filters_the_library_notices():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "a warning the user should see" in result.stderr
    assert "Transformer Engine" not in result.stderr and "old API" not in result.stderr
