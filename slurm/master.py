"""Where the ranks of a Slurm job meet: the first node of the allocation, an address for it, and a
port every task derives from the job id without talking to the others."""
import re
import shutil
import socket
from typing import Mapping

from gridtrain.errors import UserError
from gridtrain.slurm.client import slurm_command
from gridtrain.slurm.hostlist import expand_nodelist


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: `scontrol show hostnames` when Slurm is installed (it knows
    every syntax), else our parser."""
    if shutil.which("scontrol"):
        out = slurm_command("scontrol", "show", "hostnames", nodelist)
        hosts = out.stdout.split() if out.returncode == 0 else []
        if hosts and not any(c in hosts[0] for c in "[],"):  # a list Slurm could not expand comes back as is
            return hosts[0]
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


def master_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else one derived from the job id (20000-39999: outside the ephemeral
    range, and two jobs sharing a node get different ports)."""
    name = "MASTER_PORT" if "MASTER_PORT" in env else "SLURM_JOB_ID"
    text = env.get(name, "0")
    if not text.strip().isdigit():
        raise UserError(f"{name}={text!r}: must be a non-negative integer; check how the job was launched")
    return int(text) if name == "MASTER_PORT" else 20000 + int(text) % 20000
