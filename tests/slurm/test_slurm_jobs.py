"""`gridtrain submit` through real Slurm daemons (two slurmd, n1 and n2, on this machine): a 2-node
run (DP over the nodes) trains, checkpoints and finishes, and a job started after it exits 0 at once;
the full preemption cycle (USR1 -> save -> exit 75 -> requeue -> resume) of a `--nodes 1-2` job that
resumes on one node while n2 is drained and on two again once it is back, with the uninterrupted
run's losses and samples; the requeue cap ends a job that keeps being stopped; `--chain 2` finishes
the run in its second job; a failed job is requeued by the restart policy; and a chain's first job
cut by its real 1-minute time limit (Slurm's own USR1 warning) hands over to the second.

The preemption test sends USR1 with `scancel --signal=USR1`: the signal `--signal=USR1@<grace>`
sends (to every task of the job steps), at the moment the test needs it (during start-up, then
mid-run). Only the time-limit test waits for Slurm's warning, which comes 10-40 s into the job."""
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_config import sections, write_yaml

GRIDTRAIN = [sys.executable, "-m", "gridtrain.launcher.cli"]
STEPS = 60
BATCH = 4
# One Slurm cluster per test session (fixed ports): with pytest-xdist these tests share one worker
# (`--dist loadfile` keeps a file together; the group says why, whatever the mode).
pytestmark = pytest.mark.xdist_group("slurm")
# The DP equivalence tolerance of tests/parallel/test_equivalence.py (relative, per step's loss).
LOSS_RTOL = 2e-6
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def write_config(root: Path, data: dict, name: str, steps: int = STEPS, interval: int = 10) -> tuple[Path, Path]:
    """One rank per node, DP (auto) over the nodes, ZeRO-1, checkpoints every `interval` steps."""
    run_dir = root / name
    config = sections(data, run_dir, train={"steps": steps, "global_batch_size": BATCH},
                      checkpoint={"interval_steps": interval})
    return write_yaml(root / f"{name}.yaml", config), run_dir


def submit(cluster, config: Path, *flags: str, nodes: str = "2") -> list[str]:
    """`gridtrain submit CONFIG --nodes NODES --device cpu --ntasks-per-node 1 FLAGS`; the job ids."""
    cmd = [*GRIDTRAIN, "submit", str(config), "--nodes", nodes, "--device", "cpu", "--ntasks-per-node", "1", *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=60)
    assert result.returncode == 0, result.stderr
    return re.findall(r"^gridtrain: submitted job (\d+) ", result.stdout, re.M)


def wait_until(predicate, seconds: float, what: str, cluster):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}\n{cluster.logs()}")


def wait_training(cluster, run_dir: Path, job_id: str, more_than: int) -> None:
    """Until metrics.jsonl holds more than `more_than` train records; fails at once if the job ends."""
    def check():
        if len(train_records(run_dir)) > more_than:
            return True
        if cluster.job(job_id)["JobState"] in ENDED:
            raise AssertionError(f"job {job_id} ended before training:\n{log_of(run_dir, job_id)[-3000:]}")
        return False

    wait_until(check, 120, f"job {job_id} to train", cluster)


def wait_ended(cluster, job_id: str, seconds: float = 150) -> dict:
    return wait_until(lambda: (lambda j: j if j["JobState"] in ENDED else None)(cluster.job(job_id)),
                      seconds, f"job {job_id} to end", cluster)


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"kind": "train"' in line]


def ranks_catching_usr1(run_dir: Path) -> int:
    """Rank processes of this run (`gridtrain launch <run_dir>/...`) that handle SIGUSR1 (bit 9 of
    SigCgt in /proc/PID/status): the daemons run here, so the test can look."""
    count = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", (proc / "status").read_text(), re.M).group(1), 16)
        except (OSError, AttributeError):
            continue
        # The rank itself, not srun, whose command line holds the same words and which catches
        # USR1 from the start (counting it raced a rank still starting: a flake seen once).
        rank = Path(argv[0].decode(errors="replace")).name.startswith("python")
        if rank and b"launch" in argv and any(arg.startswith(str(run_dir).encode()) for arg in argv):
            count += bool(caught & (1 << (10 - 1)))  # SIGUSR1 = 10
    return count


def max_rel_diff(a: list, b: list) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def listening(port: int) -> bool:
    """A TCP socket of this machine listens on `port` (/proc/net/tcp[6], state 0A)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def log_of(run_dir: Path, job_id: str) -> str:
    return (run_dir / f"slurm-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, sentences_corpus, tmp_path_factory) -> dict:
    """One submitted job trained start to end: the reference every interrupted run must equal."""
    config, run_dir = write_config(tmp_path_factory.mktemp("runs"), sentences_corpus, "whole")
    [job_id] = submit(slurm_cluster, config)
    return {"config": config, "run_dir": run_dir, "id": job_id, "job": wait_ended(slurm_cluster, job_id)}


def test_submit_trains_on_two_nodes_and_a_finished_run_exits_at_once(slurm_cluster, uninterrupted):
    run_dir, job_id, job = uninterrupted["run_dir"], uninterrupted["id"], uninterrupted["job"]
    log = log_of(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["NodeList"]) == ("COMPLETED", "0:0", "n[1-2]"), log[-3000:]
    # Rank 0's master is n1's NodeAddr (n1 does not resolve), the port is derived from the job id.
    assert f"job {job_id} restart 0: nodes n[1-2], 2 ranks, master 127.0.0.1:{20000 + int(job_id)}" in log
    assert "world 2 = TP 1 x PP 1 x DP 2" in log and "training finished at train.steps=60" in log
    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert (run_dir / "resolved-config.yaml").exists() and (run_dir / "gridtrain.sbatch").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000060"

    # A job submitted after the run finished (a chain longer than needed) ends at once, successfully.
    [again] = submit(slurm_cluster, uninterrupted["config"])
    job = wait_ended(slurm_cluster, again, 30)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0")
    assert "training already finished (step_00000060 reached train.steps=60); nothing to do" in log_of(run_dir, again)
    assert len(train_records(run_dir)) == STEPS  # no rank started


def test_srun_tasks_discover_their_ranks_and_a_wrong_world_is_one_line(slurm_cluster, uninterrupted):
    """`gridtrain env` under srun on both nodes: the job, the rank each task discovers, and the
    master address Slurm's NodeAddr gives (n1 does not resolve). `gridtrain launch` on 2 tasks of
    a 4-rank layout: each rank says so in one line and exits 2, before any process group."""
    result = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--label", *GRIDTRAIN, "env")
    rows = [re.sub(r"\s{2,}", " | ", line) for line in result.stdout.splitlines()]  # "0: name | value"
    job_id = re.search(r"slurm job \| (\d+) ", "\n".join(rows)).group(1)
    port = 20000 + int(job_id) % 20000
    for rank in (0, 1):
        assert f"{rank}: slurm job | {job_id} (restart 0), nodes n[1-2], 2 tasks, partition debug" in rows
        assert (f"{rank}: rank discovery | Slurm (SLURM_PROCID, SLURM_NTASKS): rank {rank} of 2, local rank 0, "
                f"master 127.0.0.1:{port}") in rows

    result = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--label", *GRIDTRAIN, "launch",
                               str(uninterrupted["config"]), "--parallel.tensor_parallel=2",
                               "--parallel.pipeline_parallel=2", check=False)
    assert result.returncode == 2, result.stderr
    errors = sorted(line for line in result.stderr.splitlines() if "gridtrain" in line)
    assert errors == [f"{rank}: gridtrain: error: world_size=2: must be a multiple of parallel.tensor_parallel (2) x "
                      "parallel.pipeline_parallel (2) = 4 (parallel.data_parallel auto is the world over TP x PP); "
                      "launch a multiple of 4 ranks or change the layout" for rank in (0, 1)]


def test_nodelists_and_master_addresses_agree_with_slurm(slurm_cluster, monkeypatch):
    """Our hostlist parser (used where scontrol is missing) expands as Slurm's own `scontrol show
    hostnames` does, and the master address of a node whose name does not resolve is the NodeAddr
    Slurm reports (a name that resolves is kept; one Slurm does not know either is one line)."""
    from gridtrain.errors import UserError
    from gridtrain.slurm.hostlist import expand_nodelist
    from gridtrain.slurm.master import first_host, master_host

    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    # (Slurm 22.05 calls text after a lone bracket group, "gpu-[1,3]-ib", an invalid hostlist; it
    # never writes one into SLURM_JOB_NODELIST, and our parser's reading of it is unit-tested.)
    for nodelist in ("node[01-03,07]", "gpu7", "a1,b[8-10]", "rack[1-2]-n[09-10]", "gpu[1,3],login"):
        assert expand_nodelist(nodelist) == slurm_cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()
    assert first_host("n[1-2]") == "n1"
    assert (master_host("n1"), master_host("localhost")) == ("127.0.0.1", "localhost")
    with pytest.raises(UserError, match=r"the first node 'n9.invalid' does not resolve as a host name and "
                                        r"`scontrol -o show node n9.invalid` gave no NodeAddr \(.+\); set MASTER_ADDR"):
        master_host("n9.invalid")


def test_job_end_requeues_array_tasks_by_task_id_and_reports_failures(slurm_cluster, uninterrupted, tmp_path):
    """`gridtrain slurm-job end` (the batch script's last step) in real batch jobs, given srun's
    status: an array task stopped with a checkpoint is requeued as <array job>_<task> and then ended
    by the cap; a crash after progress (the run's checkpoint is newer than --since) is requeued
    once, then ended by --max-restarts 1; bad input (2) is never requeued; a job Slurm refuses to
    requeue (--no-requeue) fails with Slurm's reason. No ranks start: the decision alone is tested
    here, the whole cycle above."""
    end = f"{shlex.join(GRIDTRAIN)} slurm-job end {uninterrupted['config']}"

    def sbatch(name: str, *flags: str, status: int, cap: int) -> str:
        out = slurm_cluster.run("sbatch", "--parsable", f"--job-name={name}", f"--output={tmp_path}/{name}.out",
                                "--open-mode=append", *flags, "--wrap",
                                f"{end} --status {status} --max-requeues {cap} --max-restarts 1 --since 0")
        return out.stdout.strip()

    array = sbatch("array", "--array=3", "--requeue", status=75, cap=1)
    crash = sbatch("crash", "--requeue", status=1, cap=3)
    bad = sbatch("bad", "--requeue", status=2, cap=3)
    refused = sbatch("refused", "--no-requeue", status=75, cap=3)
    task = f"{array}_3"

    def log(name: str) -> list[str]:  # gridtrain's lines (slurmstepd adds its own on a requeue)
        return [line for line in (tmp_path / f"{name}.out").read_text().splitlines() if line.startswith("gridtrain:")]

    job = wait_ended(slurm_cluster, task, 90)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "75:0", "1"), log("array")
    assert log("array") == [
        f"gridtrain: job {task}: stopped with a checkpoint; requeued (restart 1 of at most 1)",
        f"gridtrain: job {task}: stopped with a checkpoint but not requeued: it has been requeued 1 time(s), "
        "the cap (--max-requeues 1); submit again to continue"]

    job = wait_ended(slurm_cluster, crash, 90)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "1:0", "1"), log("crash")
    failed = f"gridtrain: job {crash}: a rank or a node failed (srun exit status 1; see the ranks' output above); "
    assert log("crash") == [
        failed + "requeued to resume from step 60 (restart 1 of at most 1)",
        failed + "not restarted: 1 restart(s) used, the cap (--max-restarts 1); submit again to resume from step 60"]
    assert (uninterrupted["run_dir"] / f"slurm-{crash}.restarts").read_text() == (
        "restart 1 after srun exit status 1, from step 60\n")

    job = wait_ended(slurm_cluster, bad, 30)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "2:0", "0"), log("bad")
    assert log("bad") == [
        f"gridtrain: job {bad}: the ranks reported bad input (srun exit status 2; see the ranks' output above); not "
        "restarted: a rank reported bad input (exit 2), which fails again the same way; fix it and submit again"]

    job = wait_ended(slurm_cluster, refused, 30)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "75:0", "0"), log("refused")
    [line] = log("refused")
    assert line.startswith(f"gridtrain: job {refused}: stopped with a checkpoint, but `scontrol requeue {refused}` "
                           "failed: ") and line.endswith("; submit again to continue"), line


def test_preemption_resumes_on_the_nodes_slurm_gives_then_the_cap_ends_the_job_and_the_chain_finishes(
        slurm_cluster, sentences_corpus, uninterrupted, tmp_path):
    """Job 1 of `--nodes 1-2 --chain 2 --max-requeues 2`, preempted three times (USR1 -> save, exit
    75): during start-up on both nodes, with n2 drained meanwhile, so the requeued job runs on n1 alone
    at DP 1; then with n2 back, so it runs on both again at DP 2; the third stop reaches the cap and
    job 2 (afterany) resumes and finishes. The global batch stays 4: every step is trained once on
    the same samples, and each step's loss matches the uninterrupted 2-node run within the DP
    equivalence tolerance (the reduction order differs), which a one-step shift of the data breaks."""
    config, run_dir = write_config(tmp_path, sentences_corpus, "preempted")
    first, second = submit(slurm_cluster, config, "--chain", "2", "--max-requeues", "2", nodes="1-2")
    assert slurm_cluster.job(second)["Dependency"].startswith(f"afterany:{first}")

    # The first warning comes while the ranks are still starting: both handle USR1 already but
    # nobody listens on the master port yet, so neither has reached its process group (where the
    # trainer's own handler is installed, after it). They must not die of it, but train a step,
    # save and stop like ranks warned later.
    master_port = 20000 + int(first) % 20000
    wait_until(lambda: ranks_catching_usr1(run_dir) == 2 and not listening(master_port), 60,
               "both ranks to catch USR1 before their process group exists", slurm_cluster)
    slurm_cluster.run("scontrol", "update", "nodename=n2", "state=drain", "reason=gridtrain-test")
    try:
        slurm_cluster.run("scancel", "--signal=USR1", first)  # what --signal=USR1@<grace> sends
        wait_until(lambda: slurm_cluster.job(first)["Restarts"] == "1", 60, "the first requeue", slurm_cluster)
        wait_training(slurm_cluster, run_dir, first, len(train_records(run_dir)))
        assert slurm_cluster.job(first)["NodeList"] == "n1"
    finally:
        slurm_cluster.run("scontrol", "update", "nodename=n2", "state=resume")
    slurm_cluster.run("scancel", "--signal=USR1", first)
    wait_until(lambda: slurm_cluster.job(first)["Restarts"] == "2", 60, "the second requeue", slurm_cluster)
    wait_training(slurm_cluster, run_dir, first, len(train_records(run_dir)))
    slurm_cluster.run("scancel", "--signal=USR1", first)
    job = wait_ended(slurm_cluster, first)
    log = log_of(run_dir, first)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "75:0", "2"), log[-3000:]
    assert log.count("stop requested by SIGUSR1: saved step") == 3 and "stop requested by SIGUSR1: saved step 1 and" in log
    assert f"job {first}: stopped with a checkpoint; requeued (restart 1 of at most 2)" in log
    two, one = "TP 1 x PP 1 x DP 2, ZeRO 1", "TP 1 x PP 1 x DP 1, ZeRO 1"
    assert f"job {first} restart 1: nodes n1, 1 ranks" in log and "world 1 = TP 1 x PP 1 x DP 1" in log
    assert re.search(rf"resharded \S+/step_00000001 from {two} to {one} ", log), log[-3000:]
    assert f"job {first} restart 2: nodes n[1-2], 2 ranks" in log
    assert re.search(rf"resharded \S+/step_\d+ from {one} to {two} ", log), log[-3000:]
    assert (f"job {first}: stopped with a checkpoint but not requeued: it has been requeued 2 time(s), "
            f"the cap (--max-requeues 2); job {second} of the chain resumes from it") in log

    job = wait_ended(slurm_cluster, second)
    log = log_of(run_dir, second)
    assert (job["JobState"], job["ExitCode"], job["NodeList"]) == ("COMPLETED", "0:0", "n[1-2]"), log[-3000:]
    assert "resumed at step" in log and "training finished at train.steps=60" in log

    records, reference = train_records(run_dir), train_records(uninterrupted["run_dir"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no step repeated or skipped
    assert [r["consumed_samples"] for r in records] == [BATCH * r["step"] for r in records]
    losses, expected = [r["loss"] for r in records], [r["loss"] for r in reference]
    assert losses[0] == expected[0]  # step 1 ran on both nodes, as in the reference
    assert max_rel_diff(losses, expected) <= LOSS_RTOL, max_rel_diff(losses, expected)
    # Negative control: the same run one step out of line (each step one batch later) is far outside.
    assert max_rel_diff(losses[1:], expected[:-1]) > 100 * LOSS_RTOL


def test_chain_goes_on_when_the_first_job_reaches_its_time_limit(slurm_cluster, sentences_corpus, uninterrupted, tmp_path):
    """`--chain 2 --time 1 --signal-grace 50 --max-requeues 0`, and nobody signals the job: Slurm's
    own warning (USR1, 50 s before the 1-minute limit) stops job 1 with a checkpoint, it is not
    requeued, and job 2 resumes and finishes; every step once.

    slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT), so the warning comes 10-40 s after
    the job starts: the run is sized from the uninterrupted job's step time to train well past
    that. Job 2 is given a 10-minute limit while it waits (`scontrol update`): with the same 1
    minute it would be cut anywhere in its first 10-40 s too, where a real chain's later jobs
    (hours-long limits) run to their end."""
    reference = train_records(uninterrupted["run_dir"])
    step_s = (reference[-1]["time"] - reference[0]["time"]) / (len(reference) - 1)
    # ~55 s of training: the ranks train from ~10 s into the job, so the run outlasts the warning's
    # latest moment (40 s) even if this machine runs 1.4x faster now than in the reference job.
    steps = max(200, round(55 / step_s))
    config, run_dir = write_config(tmp_path, sentences_corpus, "time-limit", steps=steps, interval=100)
    first, second = submit(slurm_cluster, config, "--chain", "2", "--time", "1", "--signal-grace", "50",
                           "--max-requeues", "0")
    slurm_cluster.run("scontrol", "update", f"JobId={second}", "TimeLimit=10")

    job = wait_ended(slurm_cluster, first, 120)
    log = log_of(run_dir, first)
    assert (job["JobState"], job["ExitCode"], job["Restarts"], job["TimeLimit"]) == (
        "FAILED", "75:0", "0", "00:01:00"), log[-3000:]
    assert "stop requested by SIGUSR1: saved step" in log  # nobody but Slurm sent it
    assert (f"job {first}: stopped with a checkpoint but not requeued: it has been requeued 0 time(s), "
            f"the cap (--max-requeues 0); job {second} of the chain resumes from it") in log
    cut = len(train_records(run_dir))
    assert 0 < cut < steps

    job = wait_ended(slurm_cluster, second, 150)
    log = log_of(run_dir, second)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert f"resumed at step {cut}, {cut * BATCH} samples consumed" in log
    assert f"training finished at train.steps={steps}" in log
    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["consumed_samples"] for r in records] == [BATCH * r["step"] for r in records]
