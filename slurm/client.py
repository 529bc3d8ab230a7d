"""Slurm's client commands (scontrol, squeue, sbatch) as gridtrain runs them: shielded from the
job's preemption signals, with a bounded wait, and a failure as a result rather than an exception."""
import os
import signal
import subprocess

from gridtrain.errors import UserError


def run_shielded(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` with the preemption signals (USR1, TERM) blocked in it. Ranks ask Slurm while
    starting, when `scancel --signal=USR1` or a time-limit warning reaches every process of the job
    step, children too: an unprotected scontrol died of it (seen once in the tests) and the rank
    went on with a wrong master address. A blocked signal stays blocked across fork and exec; this
    process receives its own copy once its mask is restored."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def slurm_command(*cmd: str) -> subprocess.CompletedProcess:
    """A Slurm client command (scontrol, squeue), shielded from the job's preemption signals. A
    command that is missing (127) or gives no answer within 60 s (124) is a failed result, not an
    exception: every caller has a fallback or a message for a failure."""
    try:
        return run_shielded(list(cmd), timeout=60)
    except OSError as exc:
        return subprocess.CompletedProcess(list(cmd), 127, "", str(exc))
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(cmd), 124, "", "no answer within 60 s")


def call_sbatch(sbatch: str, script, after: str | None) -> str:
    """Submit `script`; returns the job id. `after`: start only once that job has ended."""
    cmd = [sbatch, "--parsable"] + ([f"--dependency=afterany:{after}"] if after else []) + [str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise UserError(f"sbatch refused the job: {message}")
    return result.stdout.strip().split(";")[0]  # "<id>[;<cluster>]"
