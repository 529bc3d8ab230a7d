"""Rank discovery for `gridtrain launch`: map whatever started this process (torchrun, Slurm's srun,
mpirun/mpiexec) onto the torch.distributed variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT, so the trainer initialises its process group the same way everywhere."""
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

from gridtrain.launcher.errors import UserError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class RankEnv:
    source: str  # "torchrun" | "mpi" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def discover() -> RankEnv:
    """Resolve this process's rank environment and export it into os.environ."""
    found = resolve(os.environ)
    os.environ.update({
        "RANK": str(found.rank), "WORLD_SIZE": str(found.world_size),
        "LOCAL_RANK": str(found.local_rank), "MASTER_ADDR": found.master_addr,
        "MASTER_PORT": str(found.master_port),
    })
    return found


def resolve(env: Mapping[str, str]) -> RankEnv:
    """RankEnv from `env`. torchrun's variables win; then MPI (mpirun inside a Slurm allocation
    inherits the batch step's SLURM_PROCID=0, so MPI must come before Slurm); then srun's."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankEnv("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                       env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", DEFAULT_PORT))
    mpi = _mpi_ranks(env)
    if mpi is not None:
        rank, world, local = mpi
        addr, port = _mpi_master(env, rank, world)
        return RankEnv("mpi", rank, world, local, addr, port)
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (master_host(first_host(nodes)) if nodes else "127.0.0.1")
        # Every task of the job must pick the same port without talking: derive it from the job id.
        port = slurm_master_port(env)
        return RankEnv("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), addr, port)
    return RankEnv("single", 0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", _free_port()))


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in env:
        if default is None:
            raise UserError(f"{name} is not set; the launcher ({_launcher_hint(name)}) should export it")
        return default
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"{name}={env[name]!r}: must be an integer; check how the job was launched") from None


def _launcher_hint(name: str) -> str:
    return "srun" if name.startswith("SLURM") else "mpirun" if name.startswith(("OMPI", "PMI")) else "torchrun"


def _mpi_ranks(env: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(rank, world, local rank) from Open MPI, MPICH/Hydra or PMIx variables, if present."""
    if "OMPI_COMM_WORLD_RANK" in env:
        return (_int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0))
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return _int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), _int(env, "MPI_LOCALRANKID", 0)
    if "PMIX_RANK" in env and ("PMIX_SIZE" in env or "OMPI_COMM_WORLD_SIZE" in env):
        world = _int(env, "PMIX_SIZE") if "PMIX_SIZE" in env else _int(env, "OMPI_COMM_WORLD_SIZE")
        return _int(env, "PMIX_RANK"), world, _int(env, "PMIX_LOCAL_RANK", 0)
    return None


def _mpi_master(env: Mapping[str, str], rank: int, world: int) -> tuple[str, int]:
    """MASTER_ADDR/PORT given by the user, else rank 0's host and a free port broadcast over MPI."""
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    try:
        from mpi4py import MPI  # initialises MPI: only import it when started by an MPI launcher
    except ImportError:
        if world == 1:
            return "127.0.0.1", _free_port()
        raise UserError("MASTER_ADDR/MASTER_PORT are not set and mpi4py is not installed; export both "
                        "(rank 0's host and a free port) or pip install 'gridtrain[mpi]'") from None
    comm = MPI.COMM_WORLD
    chosen = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    addr, port = comm.bcast(chosen, root=0)
    return env.get("MASTER_ADDR", addr), _int(env, "MASTER_PORT", port)


def slurm_master_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else one derived from the job id (20000-39999: outside the ephemeral
    range, and two jobs sharing a node get different ports)."""
    return _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000


def port_in_use(port: int) -> bool:
    """Whether a TCP server could not listen on `port` here (SO_REUSEADDR as c10d's store sets it,
    so a port only in TIME_WAIT counts as free)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: `scontrol show hostnames` when Slurm is installed (it knows
    every syntax), else our parser."""
    if shutil.which("scontrol"):
        out = slurm_command("scontrol", "show", "hostnames", nodelist)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    return expand_nodelist(nodelist)[0]


def master_host(node: str) -> str:
    """An address for Slurm node `node`: its name when that resolves (the usual case, no extra
    call), else the NodeAddr Slurm reaches it by (`scontrol show node`). Sites whose node names
    are not host names (and several slurmd on one host, as in the tests) need the NodeAddr; asking
    only when the name fails keeps a large job from sending one scontrol RPC per rank. A name that
    neither resolves nor has a NodeAddr is an error now: every rank would otherwise retry it for
    the store's 10-minute connect timeout."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    why = "scontrol is not on PATH"
    if shutil.which("scontrol"):
        out = slurm_command("scontrol", "-o", "show", "node", node)
        match = re.search(r"\bNodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
        if match:
            return match.group(1)
        why = f"`scontrol -o show node {node}` gave no NodeAddr ({' '.join(out.stderr.split()) or out.returncode})"
    raise UserError(f"SLURM_JOB_NODELIST: the first node {node!r} does not resolve as a host name and {why}; "
                    "set MASTER_ADDR to an address of that node")


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


def run_shielded(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` with the preemption signals (USR1, TERM) blocked in it. Ranks ask Slurm while
    starting, when `scancel --signal=USR1` or a time-limit warning reaches every process of the job
    step, children too: an unprotected scontrol died of it (seen once in the tests) and the rank
    went on with a wrong master address. A blocked signal stays blocked across fork and exec; this
    process receives its own copy once its mask is restored."""
    import signal

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist: "node[01-03,07],gpu-a[1-2]-ib" -> node01 node02 node03 node07
    gpu-a1-ib gpu-a2-ib. Zero padding of ranges is kept; several bracket groups multiply."""
    hosts = []
    for item in _split_top_level(nodelist.strip()):
        hosts += _expand_item(item)
    if not hosts:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r}: no host in it; set MASTER_ADDR to rank 0's host")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_item(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    expanded = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"Slurm nodelist {item!r}: cannot read range {part!r}; set MASTER_ADDR explicitly")
        width = len(lo)
        for number in range(int(lo), int(hi or lo) + 1):
            expanded += [head + str(number).zfill(width) + rest for rest in _expand_item(tail)]
    return expanded
