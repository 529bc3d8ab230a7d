"""`gridtrain env`: what this machine gives a run: library versions, backend, devices, which
optional fast paths (NVIDIA apex fused norms) are available, and the Slurm / MPI environment a rank
started here would discover.

Lazy imports: torch (about 1.5 s) only in the functions that report devices and kernels, and apex
(optional, NVIDIA's build only) only to probe for it: the CLI imports this module at start-up."""
import os
import platform
from importlib import metadata

from gridtrain.errors import UserError
from gridtrain.launcher.rank_env import resolve

LIBRARIES = ("torch", "deepspeed", "megatron-core", "sentencepiece", "mpi4py", "numpy")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def apex_status() -> str:
    """NVIDIA apex is not on PyPI (the PyPI `apex` is an unrelated web toolkit): probe its fused
    norm module, which exists only in the NVIDIA build."""
    try:
        import apex.normalization  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA extension raising anything at import
        return "not installed (torch norms are used)"
    try:
        version = metadata.version("apex")
    except metadata.PackageNotFoundError:
        version = "unknown version"
    return f"installed ({version}), fused LayerNorm/RMSNorm available"


def norm_status() -> str:
    try:
        from gridtrain.model.norms import norm_implementation
    except ImportError:
        return "unknown (gridtrain.model.norms not available)"
    return str(norm_implementation())


def device_lines() -> list[tuple[str, str]]:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices = f"{len(names)} CUDA: " + ", ".join(names)
        backend = "nccl" if dist.is_nccl_available() else "gloo (NCCL not built into this torch)"
    else:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        devices = f"CPU only: {usable} usable cores ({os.cpu_count()} total)"
        backend = "gloo" if dist.is_gloo_available() else "none (gloo not built into this torch)"
    return [("backend", backend), ("devices", devices), ("torch cuda build", str(torch.version.cuda))]


def launch_lines(env) -> list[tuple[str, str]]:
    """The Slurm job this runs in (if any) and what rank discovery makes of `env`: where the rank
    came from, the world, and the master address and port."""
    rows = []
    if env.get("SLURM_JOB_ID"):
        restarts = env.get("SLURM_RESTART_COUNT", "0")
        rows.append(("slurm job", f"{env['SLURM_JOB_ID']} (restart {restarts}), nodes {env.get('SLURM_JOB_NODELIST', '?')}, "
                                  f"{env.get('SLURM_NTASKS', '?')} tasks, partition {env.get('SLURM_JOB_PARTITION', '?')}"))
    else:
        rows.append(("slurm job", "none (SLURM_JOB_ID not set)"))
    try:
        found = resolve(env)
    except UserError as exc:
        return rows + [("rank discovery", f"error: {exc}")]
    if found.source == "single":
        return rows + [("rank discovery", "a single rank (no torchrun, Slurm task or MPI variables)")]
    where = {"torchrun": "torchrun variables (RANK, WORLD_SIZE)", "mpi": "MPI launcher variables",
             "slurm": "Slurm (SLURM_PROCID, SLURM_NTASKS)"}[found.source]
    rows.append(("rank discovery", f"{where}: rank {found.rank} of {found.world_size}, local rank {found.local_rank}, "
                                   f"master {found.master_addr}:{found.master_port}"))
    return rows


def env_report() -> list[tuple[str, str]]:
    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    rows += [(name, _version(name)) for name in LIBRARIES]
    rows.append(("apex", apex_status()))
    rows += device_lines()
    rows.append(("norm implementation", norm_status()))
    rows += launch_lines(os.environ)
    return rows
