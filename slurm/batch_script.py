"""The batch script of `gridtrain submit`: one JobSpec (where the job runs, how it is stopped and
requeued) rendered into slurm/gridtrain.sbatch.template, which is package data of gridtrain.slurm."""
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TEMPLATE = "gridtrain.sbatch.template"
SITE_ENV = "site-env.sh"
SCRIPT_NAME = "gridtrain.sbatch"
LOG_PATTERN = "slurm-%j.out"  # %j: the job id (each array task has its own)


@dataclass(frozen=True)
class JobSpec:
    """One batch job: where it runs and how it is stopped and requeued."""
    nodes: int
    tasks_per_node: int  # ranks per node: one per GPU with cuda
    device: str  # "cuda" | "cpu"
    job_name: str
    log: Path  # with %j
    workdir: Path
    signal_grace: int
    max_requeues: int
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: tuple[str, ...] = ()  # --sbatch-arg values, one `#SBATCH` line each


def package_file(name: str) -> Path:
    """A file of the slurm/ folder (installed as package data of gridtrain.slurm)."""
    return Path(str(resources.files("gridtrain.slurm").joinpath(name)))


def sbatch_lines(spec: JobSpec) -> list[str]:
    """The #SBATCH lines of one job."""
    options = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.tasks_per_node}"]
    if spec.device == "cuda":
        options.append(f"--gpus-per-node={spec.tasks_per_node}")
    options += [f"--chdir={spec.workdir}", f"--output={spec.log}", "--open-mode=append", "--requeue",
                f"--signal=USR1@{spec.signal_grace}"]
    for name in ("partition", "time", "account", "qos"):
        if getattr(spec, name):
            options.append(f"--{name}={getattr(spec, name)}")
    return [f"#SBATCH {option}" for option in (*options, *spec.extra)]


def render_script(spec: JobSpec, config_path: Path, site_env: Path) -> str:
    """The batch script for `spec`, running the ranks on `config_path`."""
    template = package_file(TEMPLATE).read_text()
    values = {
        "SBATCH_LINES": "\n".join(sbatch_lines(spec)),
        "SITE_ENV": shlex.quote(str(site_env)),
        "GRIDTRAIN": shlex.join([sys.executable, "-m", "gridtrain.launcher.cli"]),
        "CONFIG": shlex.quote(str(config_path)),
        "NODES": str(spec.nodes),
        "TASKS_PER_NODE": str(spec.tasks_per_node),
        "MAX_REQUEUES": str(spec.max_requeues),
    }
    for name, value in values.items():
        template = template.replace("{{" + name + "}}", value)
    return template
