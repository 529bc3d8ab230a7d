"""Spawn the ranks of one node with torch's elastic agent (the engine behind torchrun); each rank
runs `gridtrain launch` on the resolved config. A failed rank makes the agent stop the others and
raise ChildFailedError, which we turn into one line naming the rank.

Lazy import: torch's elastic agent (torch, about 1.5 s) is imported by `spawn` only, because the CLI
imports this module for the rank environment and the error types before it knows it will start ranks."""
import builtins
import os
import re
import signal
import warnings
from dataclasses import dataclass

import psutil

from gridtrain.errors import UserError
from gridtrain.train.preemption import PREEMPTED_EXIT_CODE

# The agent turns these into "stop every rank now" (it forwards them, then SIGKILLs after its
# shutdown timeout). SIGTERM and SIGUSR1 are preemption warnings instead (Slurm sends them before
# killing a job): stop_signal_forwarding() passes them on and keeps the agent running, so ranks
# checkpoint, exit 75 together, and the launcher reports it.
AGENT_SIGNALS = ("SIGINT", "SIGHUP", "SIGQUIT")
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass(frozen=True)
class NodeSpec:
    nnodes: int
    nproc_per_node: int
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


class RankFailed(Exception):
    """One or more ranks exited non-zero; str() names them."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def set_rank_environment(device: str) -> None:
    """Environment every rank inherits. CPU: one thread per rank unless the user chose (ranks share
    the cores). CUDA: Megatron's settings for ordered TP communication and NCCL fail-fast."""
    if device == "cuda":
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
        # Saying so spares every rank DeepSpeed's "unable to detect an accelerator" warning.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Library notices repeated by every rank bury the training log (megatron-core's fallback notice
    # is the same fact `gridtrain env` reports once); the user's own PYTHONWARNINGS wins.
    # megatron-core's CUDA_DEVICE_MAX_CONNECTIONS advice is set above for CUDA and means nothing on CPU.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning,"
                          "ignore:Transformer Engine and Apex are not installed:UserWarning,"
                          "ignore:When using async grad allreduce it is recommended:UserWarning")
    # A rank started by srun or mpirun runs this itself, after its interpreter has read the
    # variable: apply the filters to this process too, before megatron-core is imported.
    apply_warning_filters(os.environ["PYTHONWARNINGS"])


def apply_warning_filters(spec: str) -> None:
    """PYTHONWARNINGS entries `action:message:category` (message a literal prefix, category a
    builtin warning class, as Python reads them at start-up) as warnings filters of this process."""
    for entry in filter(None, spec.split(",")):
        action, message, category = (entry.split(":") + ["", ""])[:3]
        category_class = getattr(builtins, category, None) if category else Warning
        if action not in ("ignore", "default", "always", "module", "once", "error") or not (
                isinstance(category_class, type) and issubclass(category_class, Warning)):
            continue  # Python ignores an invalid entry too (with a notice at start-up)
        warnings.filterwarnings(action, message=re.escape(message), category=category_class)


def torchrun_args(node: NodeSpec, config_path: str, launch_flags=()) -> list[str]:
    """torchrun arguments running `python -m gridtrain.launcher.cli launch CONFIG [FLAGS]` on this node."""
    args = [f"--nnodes={node.nnodes}", f"--nproc-per-node={node.nproc_per_node}", "--max-restarts=0",
            "--monitor-interval=0.5", f"--signals-to-handle={','.join(AGENT_SIGNALS)}"]
    if node.master_addr is None and node.nnodes == 1:
        args.append("--standalone")  # c10d rendezvous on a free local port
    else:
        if node.master_addr is None or node.master_port is None:
            raise UserError("--master-addr and --master-port are required with --nnodes > 1 "
                            "(the host and a free port of node 0, the same on every node)")
        args += ["--rdzv-backend=static", f"--node-rank={node.node_rank}",
                 f"--master-addr={node.master_addr}", f"--master-port={node.master_port}"]
    return args + ["-m", "gridtrain.launcher.cli", "launch", config_path, *launch_flags]


def spawn(node: NodeSpec, config_path: str, device: str, launch_flags=()) -> None:
    """Run this node's ranks (`gridtrain launch CONFIG FLAGS`) to completion; raise RankFailed
    naming the failed rank(s)."""
    set_rank_environment(device)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(node, config_path, launch_flags))
    previous = {signum: signal.signal(signum, _forward_to_ranks) for signum in PREEMPTION_SIGNALS}
    try:
        run(args)
    except ChildFailedError as exc:
        raise RankFailed(describe_failures(exc.failures), _exit_code(exc.failures)) from None
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        raise RankFailed(f"stopped by {name}: every rank of this node was stopped", 128 + int(exc.sigval)) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _forward_to_ranks(signum, frame) -> None:
    """Pass a preemption signal to this node's ranks (the agent starts each in its own session, so
    a signal to the launcher alone never reaches them)."""
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def describe_failures(failures: dict) -> str:
    """One line: every failed global rank with its exit code or signal, the first failure first."""
    if _preempted(failures):
        return (f"stopped on a preemption signal: the ranks wrote a checkpoint and exited {PREEMPTED_EXIT_CODE}; "
                "run the same command to resume")
    ordered = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    parts = []
    for rank, failure in ordered:
        if failure.exitcode < 0:
            how = f"killed by {failure.signal_name()}"
        else:
            how = f"exit code {failure.exitcode}"
        reason = _recorded_error(failure)
        if reason:
            how += f" ({reason})"
        parts.append(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed: {how}")
    return "; ".join(parts) + "; the other ranks were stopped (see the rank's output above)"


def _recorded_error(failure) -> str:
    """The last line of the exception the rank recorded (`record()` in `gridtrain launch`), if any:
    with torch 2.13 `message` is the error file's {"message": text, "extraInfo": ...}."""
    if not os.path.isfile(failure.error_file):
        return ""
    message = failure.message
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    lines = text.strip().splitlines()
    return lines[-1][:400] if lines else ""


def _preempted(failures: dict) -> bool:
    """A rank exits 75 only after the checkpoint all ranks wrote together is published; the agent
    then SIGTERMs the ranks still tearing down, so those count as part of the same clean stop."""
    codes = {failure.exitcode for failure in failures.values()}
    torn_down = {-signal.SIGTERM, -signal.SIGKILL}
    return PREEMPTED_EXIT_CODE in codes and codes <= {PREEMPTED_EXIT_CODE, *torn_down}


def _exit_code(failures: dict) -> int:
    """75 for a clean preemption stop (checkpoint written: requeue), 2 if every failed rank
    reported a user error, else 1."""
    if _preempted(failures):
        return PREEMPTED_EXIT_CODE
    return 2 if {failure.exitcode for failure in failures.values()} == {2} else 1
