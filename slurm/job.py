"""The decisions of the batch script `gridtrain submit` renders, kept in Python and run by
`gridtrain slurm-job start|end CONFIG` (only that script calls them). No torch.

start: says which job and restart this is and where its master is, prints the newest checkpoint's
       step (the batch script hands it to `end` as --since), and exits FINISHED_EXIT_CODE when that
       checkpoint has already reached train.steps, so a chained or requeued job with nothing left to
       train ends at once instead of loading every rank.
end:   maps the ranks' exit status onto the job's fate: 0 finished; PREEMPTED_EXIT_CODE (a
       checkpoint was written) -> `scontrol requeue` unless the job's preemption requeues have
       reached --max-requeues; 2 (bad input) is returned as it is; any other status is a rank or a
       node that failed -> `scontrol requeue` as the restart policy (gridtrain.train.restarts)
       allows: at most --max-restarts times, and not after an attempt that saved no new checkpoint.
       Failure restarts are counted in <run_dir>/slurm-<job>.restarts (one line each), since
       SLURM_RESTART_COUNT counts both kinds of requeue.

Which nodes the requeued job runs on is Slurm's choice: a node that failed is set DOWN or DRAIN by
slurmctld and not allocated again, and a job submitted with --nodes MIN-MAX starts on what is left.
Nothing is excluded by hand: srun's status does not say reliably which node a failure came from."""
import re
import sys
from pathlib import Path

from gridtrain.errors import UserError
from gridtrain.slurm.client import slurm_command
from gridtrain.slurm.master import first_host, master_host, master_port
from gridtrain.train.checkpoint.manifest import verify_checkpoint
from gridtrain.train.checkpoint.store import checkpoint_dir, list_checkpoints
from gridtrain.train.preemption import PREEMPTED_EXIT_CODE
from gridtrain.train.restarts import USER_ERROR_EXIT_CODE, Attempt, newest_step, refusal

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


def start(cfg, env, ranks_per_node: int | None = None) -> int:
    print(newest_step(checkpoint_dir(cfg.checkpoint, cfg.train.run_dir)), flush=True)  # end's --since
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    done = finished_checkpoint(cfg)
    if done is not None:
        say(f"job {job_id(env)}: training already finished ({done.name} reached train.steps="
            f"{cfg.train.steps}); nothing to do")
        return FINISHED_EXIT_CODE
    nodes = env.get("SLURM_JOB_NODELIST", "")
    master = master_host(first_host(nodes)) if nodes else "?"
    port = master_port(env)
    say(f"job {job_id(env)} restart {restarts}: nodes {nodes or '?'}, {job_ranks(env, ranks_per_node)} ranks, "
        f"master {master}:{port}, run {cfg.train.run_dir}")
    return 0


def job_ranks(env, ranks_per_node: int | None) -> str:
    """The job's rank count: the nodes it got x the ranks per node (a --nodes MIN-MAX job has no
    SLURM_NTASKS), else SLURM_NTASKS."""
    nodes = env.get("SLURM_JOB_NUM_NODES", "")
    if ranks_per_node and nodes.isdigit():
        return str(int(nodes) * ranks_per_node)
    return env.get("SLURM_NTASKS", "?")


def end(cfg, status: int, max_requeues: int, env, max_restarts: int = 0, since: int = 0) -> int:
    jid = job_id(env)
    if status == 0:
        say(f"job {jid}: training finished at train.steps={cfg.train.steps}")
        return 0
    failures = Path(cfg.train.run_dir) / f"slurm-{jid}.restarts"
    used = len(failures.read_text().splitlines()) if failures.exists() else 0
    if status != PREEMPTED_EXIT_CODE:
        return _failed(cfg, jid, status, Attempt(restarts=used, started_at=since), max_restarts, failures)
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0) - used  # the requeues that followed a preemption
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


def _failed(cfg, jid: str, status: int, attempt: Attempt, max_restarts: int, failures: Path) -> int:
    """A failed attempt: requeue it as the restart policy allows, else end with its status."""
    what = "the ranks reported bad input" if status == USER_ERROR_EXIT_CODE else "a rank or a node failed"
    reached = newest_step(checkpoint_dir(cfg.checkpoint, cfg.train.run_dir))
    why = refusal(attempt, status, reached, max_restarts, "--max-restarts", again="submit again")
    if why is None:
        result = slurm_command("scontrol", "requeue", jid)
        if result.returncode == 0:
            with failures.open("a") as record:
                record.write(f"restart {attempt.restarts + 1} after srun exit status {status}, from step {reached}\n")
            say(f"job {jid}: {what} (srun exit status {status}; see the ranks' output above); requeued to resume "
                f"from step {reached} (restart {attempt.restarts + 1} of at most {max_restarts})")
            return 0
        why = f"`scontrol requeue {jid}` failed: {' '.join(result.stderr.split()) or result.returncode}"
    say(f"job {jid}: {what} (srun exit status {status}; see the ranks' output above); {why}")
    return status


def how_to_continue(jid: str) -> str:
    """Who resumes a job that is not requeued: the next job of its `--chain` (a pending job with an
    `afterany:<jid>` dependency, from squeue), else the user."""
    result = slurm_command("squeue", "--noheader", "--states=PENDING", "--format=%i %E")
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        job, _, dependency = line.partition(" ")
        if re.search(rf"afterany:{re.escape(jid)}(?![0-9_])", dependency):
            return f"job {job} of the chain resumes from it"
    return "submit again to continue"
