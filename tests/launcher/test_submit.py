"""`gridtrain submit` without a cluster: the --dry-run script (what a 64-GPU job gets, validated as
CUDA on this CPU machine, imports no torch/deepspeed/megatron and writes nothing) and the one-line
errors with exit status 2. The jobs themselves run through real Slurm daemons in tests/slurm."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = str(REPO / "configs" / "llama-8b.yaml")  # TP 8 x DP 8 = 64 ranks


@pytest.fixture
def data(corpus) -> list[str]:
    """Overrides pointing the preset's data at the session corpus (submit checks the files exist)."""
    return [f"--data.blend=[[1.0, {corpus.text}]]", f"--data.tokenizer={corpus.tokenizer}"]


def gridtrain(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gridtrain.launcher.cli", *args], capture_output=True,
                          text=True, env=env or os.environ, timeout=60)


def test_dry_run_prints_the_batch_script_for_8_nodes_of_8_gpus(tmp_path, data):
    run_dir = tmp_path / "run"
    code = ("import sys; from gridtrain.launcher.cli import main; rc = main(sys.argv[1:]); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'megatron')); "
            "print('HEAVY', heavy, file=sys.stderr); sys.exit(rc)")
    result = subprocess.run(
        [sys.executable, "-c", code, "submit", LLAMA_8B, "--nodes", "8", "--gpus-per-node", "8",
         "--partition", "gpu", "--time", "24:00:00", "--account", "proj", "--qos", "high",
         "--signal-grace", "300", "--max-requeues", "5", "--sbatch-arg=--exclusive", f"--train.run_dir={run_dir}",
         *data, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr  # validated as CUDA on a CPU host without importing torch
    script = result.stdout
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=run", "#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
        f"#SBATCH --chdir={os.getcwd()}", f"#SBATCH --output={run_dir}/slurm-%j.out", "#SBATCH --open-mode=append",
        "#SBATCH --requeue", "#SBATCH --signal=USR1@300", "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00",
        "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --exclusive"]
    assert script.startswith("#!/bin/bash\n")
    assert 'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=8 ' in script
    assert '"${GRIDTRAIN[@]}" launch "$CONFIG" &' in script
    assert f"CONFIG={run_dir}/resolved-config.yaml" in script and "--max-requeues 5 --max-restarts 3" in script
    assert f"SITE_ENV={REPO}/slurm/site-env.sh" in script
    assert not run_dir.exists()  # a dry run writes nothing
    # The rendered script is valid bash.
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0

    # A node range: Slurm's -N min-max, every node count of it validated, DP from the world.
    result = gridtrain("submit", LLAMA_8B, "--nodes", "1-2", "--gpus-per-node", "8", "--parallel.data_parallel=auto",
                       "--max-restarts", "1", f"--train.run_dir={run_dir}", *data, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=1-2\n#SBATCH --mincpus=8\n#SBATCH --gpus-per-node=8\n" in result.stdout
    assert "--ntasks-per-node=8 --kill" in result.stdout and "--max-restarts 1" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "2", "--gpus-per-node", "4"],
     "--nodes 2 x --gpus-per-node 4 = 8 ranks: world_size=8: must equal parallel.tensor_parallel (8) x "
     "parallel.pipeline_parallel (1) x parallel.data_parallel (8) = 64; set parallel.data_parallel to auto (here 1), "
     "or launch 64 ranks"),
    (["--nodes", "2-1", "--gpus-per-node", "8"], "--nodes 2-1: MIN above MAX; give --nodes 1-2"),
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes 0: a job runs on at least one node; e.g. --nodes 1 or --nodes 1-2"),
    (["--nodes", "two", "--gpus-per-node", "8"],
     "--nodes two: not a node count; give N or MIN-MAX, e.g. --nodes 4 or --nodes 2-4"),
    # auto DP over a node range: every count the job may get must split TP x PP and the global batch.
    (["--nodes", "1-2", "--gpus-per-node", "4", "--parallel.data_parallel=auto"],
     "--nodes 1 (in the range) x --gpus-per-node 4 = 4 ranks: world_size=4: must be a multiple of "
     "parallel.tensor_parallel (8) x parallel.pipeline_parallel (1) = 8 (parallel.data_parallel auto is the world "
     "over TP x PP); launch a multiple of 8 ranks or change the layout"),
    (["--nodes", "4-8", "--gpus-per-node", "8", "--parallel.data_parallel=auto"],
     "--nodes 5 (in the range) x --gpus-per-node 8 = 40 ranks: train.global_batch_size=512: must be a multiple of "
     "train.micro_batch_size (1) x data_parallel (5) = 5: every DP rank accumulates whole micro-batches; use 510 or "
     "515, or change micro_batch_size"),
    (["--nodes", "8", "--gpus-per-node", "8", "--device", "cpu"],
     "--gpus-per-node does not apply to --device cpu: give --ntasks-per-node (ranks per node)"),
    (["--nodes", "8", "--gpus-per-node", "8", "--checkpoint.interval_steps=0",
      "--checkpoint.interval_minutes=0"],
     "checkpoint.interval_steps=0: a Slurm job must checkpoint to be requeued, chained or told it has finished: "
     "set checkpoint.interval_steps (or interval_minutes) > 0"),
    (["--nodes", "8", "--gpus-per-node", "8", "--site-env", "/nonexistent/site.sh", "--dry-run"],
     "--site-env /nonexistent/site.sh: no such file; give the site environment file the job should source"),
    (["--nodes", "8", "--gpus-per-node", "8"],  # run with PATH lacking sbatch
     "sbatch is not on PATH: run `gridtrain submit` where Slurm's commands are (a login node), or add "
     "--dry-run to see the batch script without submitting"),
    # Values written into the batch script: a line break would start a line of its own.
    (["--nodes", "8", "--gpus-per-node", "8", "--job-name", "x\n#SBATCH --no-requeue", "--dry-run"],
     "--job-name 'x\\n#SBATCH --no-requeue': must be non-empty, without spaces, line breaks or control characters"),
    (["--nodes", "8", "--gpus-per-node", "8", "--time", "2 hours", "--dry-run"],
     "--time '2 hours': not a Slurm time limit; use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    (["--nodes", "8", "--gpus-per-node", "8", "--time", "1:00", "--signal-grace", "120", "--dry-run"],
     "--signal-grace 120: must be shorter than --time 1:00 (60 s), or the warning would come before the job starts"),
    (["--nodes", "8", "--gpus-per-node", "8", "--sbatch-arg", "exclusive", "--sbatch-arg=--signal=B:USR1@60",
      "--dry-run"],
     "--sbatch-arg 'exclusive': must be one sbatch option on one line, e.g. --sbatch-arg=--exclusive; "
     "--sbatch-arg '--signal=B:USR1@60': gridtrain sets --signal itself; use --signal-grace"),
])
def test_errors_are_one_line_and_exit_2(flags, message, tmp_path, data):
    env = {**os.environ, "PATH": str(tmp_path)}  # no sbatch here, whatever the machine has
    result = gridtrain("submit", LLAMA_8B, *flags, f"--train.run_dir={tmp_path / 'run'}", *data, env=env)
    assert (result.returncode, result.stderr) == (2, f"gridtrain: error: {message}\n")
    assert not (tmp_path / "run").exists()


def test_help_lists_the_flags_the_readme_uses():
    result = gridtrain("submit", "--help")
    for flag in ("--nodes", "--gpus-per-node", "--device", "--ntasks-per-node", "--chain", "--signal-grace",
                 "--max-requeues", "--max-restarts", "--sbatch-arg", "--site-env", "--dry-run"):
        assert flag in result.stdout
    assert "slurm-job" not in gridtrain("--help").stdout  # the batch script's own steps stay unlisted
