"""The decisions of the batch script `gridtrain submit` renders, kept in Python and run by
`gridtrain slurm-job start|end CONFIG` (only that script calls them). No torch.

start: says which job and restart this is and where its master is, and exits FINISHED_EXIT_CODE
       when the run's newest checkpoint has already reached train.steps, so a chained or requeued
       job with nothing left to train ends at once instead of loading every rank.
end:   maps the ranks' exit status onto the job's fate: 0 finished; PREEMPTED_EXIT_CODE (a
       checkpoint was written) -> `scontrol requeue` unless SLURM_RESTART_COUNT has reached the cap;
       anything else is a failure and is returned as the job's exit code."""
import re
import sys
from pathlib import Path

from gridtrain.errors import UserError
from gridtrain.slurm.client import slurm_command
from gridtrain.slurm.master import first_host, master_host, master_port
from gridtrain.train.checkpoint.manifest import verify_checkpoint
from gridtrain.train.checkpoint.store import checkpoint_dir, list_checkpoints
from gridtrain.train.preemption import PREEMPTED_EXIT_CODE

FINISHED_EXIT_CODE = 3  # the batch script turns it into exit 0 without starting the ranks


def say(message: str) -> None:
    print(f"gridtrain: {message}", file=sys.stderr, flush=True)


def job_id(env) -> str:
    """The id `scontrol requeue` needs: an array task is <array job id>_<task id>."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if not env.get("SLURM_JOB_ID"):
        raise UserError("SLURM_JOB_ID is not set: `gridtrain slurm-job` runs inside the batch script of "
                        "`gridtrain submit`, not by hand")
    return env["SLURM_JOB_ID"]


def finished_checkpoint(cfg) -> Path | None:
    """The newest checkpoint if it is complete (manifest and files present) and at train.steps or
    beyond, else None. Sizes only, no checksums: resuming verifies fully anyway."""
    published = list_checkpoints(checkpoint_dir(cfg.checkpoint, cfg.train.run_dir))
    if not published or published[-1][0] < cfg.train.steps:
        return None
    path = published[-1][1]
    return None if verify_checkpoint(path, checksums=False) else path


def start(cfg, env) -> int:
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    done = finished_checkpoint(cfg)
    if done is not None:
        say(f"job {job_id(env)}: training already finished ({done.name} reached train.steps="
            f"{cfg.train.steps}); nothing to do")
        return FINISHED_EXIT_CODE
    nodes = env.get("SLURM_JOB_NODELIST", "")
    master = master_host(first_host(nodes)) if nodes else "?"
    port = master_port(env)
    say(f"job {job_id(env)} restart {restarts}: nodes {nodes or '?'}, {env.get('SLURM_NTASKS', '?')} ranks, "
        f"master {master}:{port}, run {cfg.train.run_dir}")
    return 0


def end(cfg, status: int, max_requeues: int, env) -> int:
    jid = job_id(env)
    if status == 0:
        say(f"job {jid}: training finished at train.steps={cfg.train.steps}")
        return 0
    if status != PREEMPTED_EXIT_CODE:
        say(f"job {jid}: the ranks failed (srun exit status {status}); not requeued: see the ranks' output above")
        return status
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    if restarts >= max_requeues:
        say(f"job {jid}: stopped with a checkpoint but not requeued: it has been requeued {restarts} time(s), "
            f"the cap (--max-requeues {max_requeues}); {how_to_continue(jid)}")
        return PREEMPTED_EXIT_CODE
    result = slurm_command("scontrol", "requeue", jid)
    if result.returncode != 0:
        why = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        say(f"job {jid}: stopped with a checkpoint, but `scontrol requeue {jid}` failed: {why}; {how_to_continue(jid)}")
        return PREEMPTED_EXIT_CODE
    say(f"job {jid}: stopped with a checkpoint; requeued (restart {restarts + 1} of at most {max_requeues})")
    return 0


def how_to_continue(jid: str) -> str:
    """Who resumes a job that is not requeued: the next job of its `--chain` (a pending job with an
    `afterany:<jid>` dependency, from squeue), else the user."""
    result = slurm_command("squeue", "--noheader", "--states=PENDING", "--format=%i %E")
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        job, _, dependency = line.partition(" ")
        if re.search(rf"afterany:{re.escape(jid)}(?![0-9_])", dependency):
            return f"job {job} of the chain resumes from it"
    return "submit again to continue"
