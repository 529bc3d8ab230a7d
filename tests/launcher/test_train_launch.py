"""`gridtrain train` end to end with the real trainer: two launcher processes on loopback acting as
two nodes rendezvous and finish 0; SIGKILL of one rank's worker makes every process exit non-zero
within 60 s with a message naming the failed rank (no hang); a SIGSTOPped rank is named as the one
that stopped responding once the others' collectives time out; `mpiexec -n 4 gridtrain launch`
trains exactly like `gridtrain train`."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multirank import free_port
from run_config import sections, write_yaml

psutil = pytest.importorskip("psutil")

GRIDTRAIN = [sys.executable, "-m", "gridtrain.launcher.cli"]
TIMEOUT_S = 15  # parallel.timeout_minutes of the stopped-rank test
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def write_config(tmp_path: Path, data: dict, name: str, steps: int, parallel: dict | None = None,
                 checkpoint: dict | None = None) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    config = sections(data, run_dir, parallel=parallel or {}, checkpoint=checkpoint or {}, train={"steps": steps})
    return write_yaml(tmp_path / f"{name}.yaml", config), run_dir


def train_records(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"kind": "train"' in line]


def test_two_nodes_on_loopback_train_and_finish(tmp_path, sentences_corpus):
    config, run_dir = write_config(tmp_path, sentences_corpus, "two-nodes", steps=3)
    port = free_port()
    nodes = [subprocess.Popen([*GRIDTRAIN, "train", str(config), "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["consumed_samples"] == 12 and len(records[-1]["mem_bytes_per_rank"]) == 2  # 2 ranks
    assert "world 2 = TP 1 x PP 1 x DP 2" in outputs[0]  # rank 0 (node 0) logs the layout of both nodes
    assert (run_dir / "resolved-config.yaml").exists()


def start_nodes(config: Path, nnodes: int) -> list:
    """`gridtrain train` processes: one with 2 ranks, or two "nodes" of 1 rank each on loopback."""
    if nnodes == 1:
        commands = [["--nproc-per-node", "2"]]
    else:
        port = str(free_port())
        commands = [["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                     "--master-addr", "127.0.0.1", "--master-port", port] for rank in (0, 1)]
    return [subprocess.Popen([*GRIDTRAIN, "train", str(config), *flags], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV) for flags in commands]


def workers_by_rank(launchers: list) -> dict:
    return {int(p.environ().get("RANK", -1)): p for launcher in launchers
            for p in psutil.Process(launcher.pid).children(recursive=True) if "launch" in p.cmdline()}


# One agent stopping its other rank itself, and naming the killed one, is what every restart of
# tests/launcher/test_restarts.py goes through.
@pytest.mark.parametrize("nnodes", [2], ids=["two-agents"])
def test_killing_one_rank_stops_every_rank_and_names_it(tmp_path, sentences_corpus, nnodes):
    """With two agents the survivor's collective fails (gloo sees the dead peer) and its agent
    reports it: nothing hangs."""
    # A peer's collective fails at once on a dead rank; at worst it waits parallel.timeout_minutes.
    config, run_dir = write_config(tmp_path, sentences_corpus, "kill", steps=100000, parallel={"timeout_minutes": 0.5})
    launchers = start_nodes(config, nnodes)
    try:
        deadline = time.time() + 180
        while not train_records(run_dir) and all(p.poll() is None for p in launchers) and time.time() < deadline:
            time.sleep(0.5)
        assert train_records(run_dir), "training never started: " + launchers[0].stderr.read()[-3000:]
        workers = workers_by_rank(launchers)
        assert sorted(workers) == [0, 1]
        victim = workers[1]
        victim.send_signal(signal.SIGKILL)
        # No hang: the configured timeout (30 s), torchrun's 30 s grace, and a minute of slack.
        errors = [launcher.communicate(timeout=30 + 30 + 60)[1] for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    assert all(launcher.returncode != 0 for launcher in launchers)
    assert f"rank 1 (local rank {2 - nnodes}, pid {victim.pid}) failed: killed by SIGKILL" in errors[-1].splitlines()[-1]
    if nnodes == 2:  # node 0 names its own rank, which failed on the dead peer
        assert errors[0].splitlines()[-1].startswith("gridtrain: error: rank 0 (local rank 0, pid ")
    gone, alive = psutil.wait_procs(list(workers.values()), timeout=5)
    assert not alive, f"ranks still running: {alive}"


def test_sigusr1_to_the_launcher_checkpoints_every_rank(tmp_path, sentences_corpus):
    """Slurm's early warning reaches `gridtrain train`, not the ranks: the agent forwards it, all
    ranks save at the same step and stop, and the launcher says so instead of orphaning them."""
    config, run_dir = write_config(tmp_path, sentences_corpus, "usr1", steps=100000)
    [launcher] = start_nodes(config, 1)
    try:
        deadline = time.time() + 180
        while not train_records(run_dir) and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert train_records(run_dir), "training never started: " + launcher.stderr.read()[-3000:]
        workers = workers_by_rank([launcher])
        launcher.send_signal(signal.SIGUSR1)
        _, stderr = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 75, stderr[-3000:]
    assert stderr.splitlines()[-1] == ("gridtrain: stopped on a preemption signal: the ranks wrote a "
                                       "checkpoint and exited 75; run the same command to resume")
    steps = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert steps, f"no checkpoint written: {list((run_dir / 'checkpoints').iterdir())}"
    gone, alive = psutil.wait_procs(list(workers.values()), timeout=5)
    assert not alive


def test_a_stopped_rank_is_named_when_the_others_time_out(tmp_path, sentences_corpus):
    """SIGSTOP (alive, connections open, silent): the other rank's next collective gives up after
    parallel.timeout_minutes, its heartbeat check names the stopped rank and host, the launcher's
    line carries that, and the last checkpoint still verifies."""
    from gridtrain.train.checkpoint.manifest import verify_checkpoint
    from gridtrain.train.checkpoint.store import read_latest

    config, run_dir = write_config(tmp_path, sentences_corpus, "stopped", steps=100000,
                                   parallel={"timeout_minutes": TIMEOUT_S / 60},
                                   checkpoint={"interval_steps": 2})
    [launcher] = start_nodes(config, 1)
    try:
        deadline = time.time() + 180
        while len(train_records(run_dir)) < 3 and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert len(train_records(run_dir)) >= 3, "training never started: " + launcher.stderr.read()[-3000:]
        workers = workers_by_rank([launcher])
        workers[1].suspend()  # SIGSTOP
        stopped_at = time.time()
        psutil.wait_procs([workers[0]], timeout=90)
        rank0_gave_up = time.time() - stopped_at
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    last = stderr.splitlines()[-1]
    assert launcher.returncode == 1, stderr[-3000:]
    assert (f"rank 0 waited parallel.timeout_minutes=0.25 in a collective and gave up: rank 1 on host "
            f"{socket.gethostname()} (pid {workers[1].pid}) stopped responding") in last, last
    assert "rank 1 (local rank 1" in last  # the agent then stopped it (SIGKILL reaches a stopped process)
    # Rank 0 gave up after the timeout, not before (a slow step is no hang; 1 s less: a collective may
    # have begun just before the stop), and within the timeout plus the 4 s heartbeat check and a
    # minute of slack for a loaded machine (~19 s measured); the launcher then waits out torchrun's
    # 30 s grace for the stopped rank.
    assert TIMEOUT_S - 1 <= rank0_gave_up < TIMEOUT_S + 4 + 60, rank0_gave_up
    ckpts = run_dir / "checkpoints"
    assert verify_checkpoint(ckpts / read_latest(ckpts)) == []


def test_mpiexec_launch_trains_like_gridtrain_train(tmp_path, sentences_corpus):
    """TP=2 x DP=2 on 4 ranks started by MPICH's mpiexec (rank discovery from PMI_* variables,
    master address and port agreed over mpi4py) and by `gridtrain train`: identical per-step
    losses and grad norms (same layout, same reductions)."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to the venv's python (pip install 'gridtrain[mpi]')")
    layout = {"tensor_parallel": 2}
    config, ref_dir = write_config(tmp_path, sentences_corpus, "torchrun", steps=3, parallel=layout)
    proc = subprocess.run([*GRIDTRAIN, "train", str(config), "--nproc-per-node", "4"], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mpi_config, mpi_dir = write_config(tmp_path, sentences_corpus, "mpi", steps=3, parallel=layout)
    proc = subprocess.run([str(mpiexec), "-n", "4", *GRIDTRAIN, "launch", str(mpi_config)], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ref, got = train_records(ref_dir), train_records(mpi_dir)
    assert [r["step"] for r in got] == [1, 2, 3] and len(got[-1]["mem_bytes_per_rank"]) == 4
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in ref]
    assert len({r["loss"] for r in ref}) == 3  # the losses move, so equality is informative


def test_a_checkpoint_dir_one_node_cannot_see_is_refused_at_start(tmp_path, sentences_corpus):
    """Two "nodes" on loopback, the second in its own mount and UTS namespace (another hostname, a
    node-local tmpfs over the checkpoint folder): both exit 2 before training, naming the host
    that does not see rank 0's files. test_two_nodes_on_loopback_train_and_finish is the control
    (same two nodes, shared folder: it trains)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root for a private mount namespace")
    config, run_dir = write_config(tmp_path, sentences_corpus, "local-dir", steps=3, checkpoint={"interval_steps": 2})
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    port = str(free_port())
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    first = subprocess.Popen([*GRIDTRAIN, "train", str(config), *node, "--node-rank", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    inner = " ".join([f"hostname gridtrain-node2 && mount -t tmpfs tmpfs {ckpts} && exec",
                      *GRIDTRAIN, "train", str(config), *node, "--node-rank", "1"])
    second = subprocess.Popen(["unshare", "--mount", "--uts", "sh", "-c", inner],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    errors = [proc.communicate(timeout=240)[1] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [2, 2], "\n".join(e[-2000:] for e in errors)
    for err in errors:
        assert (f"is not shared by every node: ranks on gridtrain-node2 do not see the file rank 0 wrote "
                f"there on {socket.gethostname()}") in err.splitlines()[-1], err[-2000:]
    assert not train_records(run_dir) and not list(ckpts.iterdir())


def test_port_in_use_and_gpu_dry_run_on_a_cpu_host(tmp_path, sentences_corpus):
    """One line and exit 2 for a master port already taken, from `gridtrain train` on node 0 and
    from a rank 0 started by srun; a dry run of an NCCL (GPU) config on this CPU host validates it as
    CUDA without --device."""
    config, _ = write_config(tmp_path, sentences_corpus, "port", steps=3)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*GRIDTRAIN, "train", str(config), "--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "1",
                               "--master-addr", "127.0.0.1", "--master-port", str(port)],
                              capture_output=True, text=True, env=ENV, timeout=60)
        assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
            f"gridtrain: error: --master-port {port}: the port is in use on this host (node 0, where the ranks "
            "meet); pick a free port, the same on every node"), proc.stderr[-2000:]
        slurm = {**ENV, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7",
                 "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = subprocess.run([*GRIDTRAIN, "launch", str(config)], capture_output=True, text=True, env=slurm, timeout=60)
        assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
            f"gridtrain: error: MASTER_PORT={port}: the port is in use on {socket.gethostname()} (rank 0 serves the "
            "rendezvous there); export MASTER_PORT=<a free port> in the job script"), proc.stderr[-2000:]
    preset = Path(__file__).resolve().parents[2] / "configs" / "llama-8b.yaml"
    data = [f"--data.blend=[[1.0, {sentences_corpus['prefix']}]]", f"--data.tokenizer={sentences_corpus['tokenizer']}"]
    proc = subprocess.run([*GRIDTRAIN, "train", str(preset), *data, "--dry-run"], capture_output=True, text=True,
                          env=ENV, timeout=60)
    assert proc.returncode == 0 and "layout: TP=8 x PP=1 x DP=8" in proc.stdout, proc.stdout[-1500:] + proc.stderr
    proc = subprocess.run([*GRIDTRAIN, "train", str(preset), "--dry-run", "--device", "cpu"], capture_output=True,
                          text=True, env=ENV, timeout=60)
    assert proc.returncode == 2 and "parallel.backend" in proc.stderr  # negative control: validated as CPU
