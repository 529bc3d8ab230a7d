"""A real two-node Slurm cluster on this one machine for the tests: munged, slurmctld and two slurmd
(n1, n2) from Debian's `slurm-wlm`, configured in a temporary folder. The settings are the ones
shared/DESIGN.md lists as verified with Debian's 22.05 build.

The node names n1/n2 do not resolve as hosts. Rank discovery (gridtrain.launcher.rank_env) asks
Slurm for the first node's NodeAddr when its name does not resolve, so nothing here edits
/etc/hosts: that is the robust choice because it is what a real site with non-resolving node names
needs as well, it leaves the machine's files alone, and a crashed test cannot leave stale entries."""
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MUNGE_KEY = Path("/etc/munge/munge.key")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2


class SlurmUnavailable(Exception):
    """Slurm or munge cannot be installed or started here; the message says why."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict = field(default_factory=dict)  # os.environ + SLURM_CONF, for every Slurm command
    pids: list = field(default_factory=list)  # slurmctld, slurmd n1, n2
    munged_pid: int | None = None  # set when this session started munged

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """Cancel what is left, stop the Slurm daemons, then munged if this session started it."""
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True, timeout=30)
        _terminate(self.pids)
        if self.munged_pid is not None:
            _terminate([self.munged_pid])


def _terminate(pids: list) -> None:
    for pid in pids:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, 9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ensure_installed() -> None:
    """Debian's slurm-wlm and munge; the Makefile's `test` target installs them, this covers a
    plain `pytest` on a fresh machine."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and this is not root with apt-get; "
                               "install them: apt-get install slurm-wlm munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {result.stderr.strip()[-300:]}")


def start_munge() -> int | None:
    """munged as user munge with a 1024-byte key (owner munge, mode 400), unless already running;
    its pid if started here."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return None
    user = pwd.getpwnam("munge")
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        os.chown(MUNGE_KEY, user.pw_uid, user.pw_gid)
        MUNGE_KEY.chmod(0o400)
    for folder in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        os.chown(folder, user.pw_uid, user.pw_gid)
    result = subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True, text=True)
    if result.returncode:
        raise SlurmUnavailable(f"munged did not start: {result.stderr.strip()}")
    _wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, 10, "munged answers")
    return int(Path("/run/munge/munged.pid").read_text())


def write_conf(root: Path, ctld_port: int, node_ports: tuple[int, int]) -> Path:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} "
        "RealMemory=4000 State=UNKNOWN" for name, port in zip(NODES, node_ports))
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=gridtrain-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again; 10 s keeps the
# preemption tests short. Step credentials must still outlive a step's launch, which takes < 1 s here.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
MpiDefault=none
# Requeue: `scontrol requeue` works on any batch job; JobRequeue=1 makes --requeue the default too.
JobRequeue=1
# Completed jobs stay visible to `scontrol show job` long enough for the tests to read their state.
MinJobAge=600
# SIGKILL follows SIGTERM 5 s later when a job is cancelled or ends (default 30 s).
KillWait=5
# Scheduling passes often, so a requeued or dependent job starts within seconds.
SchedulerParameters=sched_interval=2,batch_sched_delay=1
{nodes}
PartitionName=debug Nodes=ALL Default=YES State=UP OverSubscribe=YES MaxTime=INFINITE
""")
    return conf


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise SlurmUnavailable(f"timed out after {seconds} s waiting until {what}")


def start_cluster(root: Path) -> SlurmCluster:
    """Install if needed, start munged, slurmctld and slurmd n1, n2; returns once both nodes are
    idle. The caller must call .stop()."""
    ensure_installed()
    munged_pid = start_munge()
    ctld_port, *node_ports = _free_ports(3)
    conf = write_conf(root, ctld_port, tuple(node_ports))
    (root / "state").mkdir()
    cluster = SlurmCluster(root, conf, {**os.environ, "SLURM_CONF": str(conf)}, munged_pid=munged_pid)
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=cluster.env, timeout=30)
        _wait(lambda: (root / "slurmctld.pid").exists(), 15, "slurmctld writes its pid file")
        cluster.pids.append(int((root / "slurmctld.pid").read_text()))
        for name in NODES:
            subprocess.run(["slurmd", "-f", str(conf), "-N", name], check=True, env=cluster.env, timeout=30)
            _wait(lambda: (root / f"slurmd.{name}.pid").exists(), 15, f"slurmd {name} writes its pid file")
            cluster.pids.append(int((root / f"slurmd.{name}.pid").read_text()))
        _wait(lambda: _idle_nodes(cluster) == set(NODES), 30, "sinfo -N shows n1 and n2 idle")
    except (SlurmUnavailable, subprocess.SubprocessError) as exc:
        logs = cluster.logs()
        cluster.stop()
        raise SlurmUnavailable(f"{exc}\n{logs}") from None
    return cluster


def _idle_nodes(cluster: SlurmCluster) -> set:
    out = cluster.run("sinfo", "-N", "-h", "-o", "%N %t", check=False).stdout.split("\n")
    return {line.split()[0] for line in out if line.split()[1:] == ["idle"]}
