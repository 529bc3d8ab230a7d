"""Rank discovery for `gridtrain launch`: map whatever started this process (torchrun, Slurm's srun,
mpirun/mpiexec) onto the torch.distributed variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT, so the trainer initialises its process group the same way everywhere."""
import os
import socket
from dataclasses import dataclass
from typing import Mapping

from gridtrain.errors import UserError
from gridtrain.slurm.master import first_host, master_host, master_port

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


# The variables each launcher sets: (rank, world size, local rank), for messages.
_NAMES = {"torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
          "mpi": ("the MPI rank", "the MPI world size", "the MPI local rank"), "single": ("rank", "world", "local rank")}


def resolve(env: Mapping[str, str]) -> RankEnv:
    """RankEnv from `env`, checked to be a possible one (0 <= rank < world, world >= 1, local
    rank >= 0). torchrun's variables win; then MPI (mpirun inside a Slurm allocation inherits the
    batch step's SLURM_PROCID=0, so MPI must come before Slurm); then srun's."""
    found = _resolve(env)
    rank_name, world_name, local_name = _NAMES[found.source]
    if found.world_size < 1:
        raise UserError(f"{world_name}={found.world_size}: a world needs at least one rank; check how the job "
                        "was launched")
    if not 0 <= found.rank < found.world_size:
        raise UserError(f"{rank_name}={found.rank}: must be in 0..{found.world_size - 1} ({world_name}="
                        f"{found.world_size}); check how the job was launched")
    if found.local_rank < 0:
        raise UserError(f"{local_name}={found.local_rank}: must be >= 0; check how the job was launched")
    return found


def _resolve(env: Mapping[str, str]) -> RankEnv:
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
        port = master_port(env)
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
