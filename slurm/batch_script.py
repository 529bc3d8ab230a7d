"""The batch script of `gridtrain submit`: one JobSpec (where the job runs, how it is stopped and
requeued) rendered into slurm/gridtrain.sbatch.template, which is package data of gridtrain.slurm."""
import re
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
    min_nodes: int
    max_nodes: int  # above min_nodes: the job starts on what is free (Slurm's -N min-max)
    tasks_per_node: int  # ranks per node: one per GPU with cuda
    device: str  # "cuda" | "cpu"
    job_name: str
    log: Path  # with %j
    workdir: Path
    signal_grace: int
    max_requeues: int
    max_restarts: int = 0
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: tuple[str, ...] = ()  # --sbatch-arg values, one `#SBATCH` line each

    @property
    def nodes(self) -> str:
        """sbatch's --nodes value: N, or MIN-MAX."""
        return str(self.min_nodes) if self.min_nodes == self.max_nodes else f"{self.min_nodes}-{self.max_nodes}"


# Options gridtrain writes itself from its own flags: an --sbatch-arg repeating one would silently
# change them (the last #SBATCH line wins), e.g. drop the USR1 warning the requeue cycle rests on.
_OWN_OPTIONS = {"--job-name": "--job-name", "--nodes": "--nodes", "-N": "--nodes", "--ntasks-per-node": "--gpus-per-node "
                "or --ntasks-per-node", "--gpus-per-node": "--gpus-per-node", "--chdir": "the directory you submit from",
                "--output": "train.run_dir", "-o": "train.run_dir", "--open-mode": "nothing (the log is appended to)",
                "--requeue": "nothing (jobs are requeued)", "--no-requeue": "--max-requeues 0",
                "--signal": "--signal-grace", "--partition": "--partition", "-p": "--partition", "--time": "--time",
                "-t": "--time", "--account": "--account", "-A": "--account", "--qos": "--qos", "-q": "--qos"}
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def time_limit_seconds(text: str) -> int | None:
    """Seconds of a Slurm time limit (sbatch --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S),
    None for UNLIMITED / INFINITE; ValueError for anything else."""
    if text.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME.fullmatch(text.strip())
    if not match:
        raise ValueError(text)
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    if third is not None:  # H:M:S
        return (first * 60 + second) * 60 + third
    return first * 60 + (second or 0)  # M or M:S


def spec_problems(spec: JobSpec) -> list[str]:
    """What in `spec` cannot go into the batch script as given, each naming the flag, the value and
    the fix. A value holding a line break would end its #SBATCH line and start another one (after
    which Slurm ignores the remaining #SBATCH lines); whitespace splits an option."""
    problems = []
    texts = {"--job-name": spec.job_name, "--partition": spec.partition, "--account": spec.account,
             "--qos": spec.qos, "train.run_dir": str(spec.log.parent), "the working directory": str(spec.workdir)}
    for flag, value in texts.items():
        if value is not None and (not value or any(c.isspace() or not c.isprintable() for c in value)):
            problems.append(f"{flag} {value!r}: must be non-empty, without spaces, line breaks or control characters")
    if spec.time is not None:
        try:
            limit = time_limit_seconds(spec.time)
        except ValueError:
            problems.append(f"--time {spec.time!r}: not a Slurm time limit; use minutes, MM:SS, HH:MM:SS, D-HH, "
                            "D-HH:MM or D-HH:MM:SS")
        else:
            if limit is not None and spec.signal_grace >= limit:
                problems.append(f"--signal-grace {spec.signal_grace}: must be shorter than --time {spec.time} "
                                f"({limit} s), or the warning would come before the job starts")
    for arg in spec.extra:
        option = arg.split("=", 1)[0]
        if not arg.startswith("-") or any(c in arg for c in "\n\r\0"):
            problems.append(f"--sbatch-arg {arg!r}: must be one sbatch option on one line, e.g. --sbatch-arg=--exclusive")
        elif option in _OWN_OPTIONS:
            problems.append(f"--sbatch-arg {arg!r}: gridtrain sets {option} itself; use {_OWN_OPTIONS[option]}")
    return problems


def package_file(name: str) -> Path:
    """A file of the slurm/ folder (installed as package data of gridtrain.slurm)."""
    return Path(str(resources.files("gridtrain.slurm").joinpath(name)))


def sbatch_lines(spec: JobSpec) -> list[str]:
    """The #SBATCH lines of one job."""
    # A node range must not name a task count: sbatch turns --ntasks-per-node into ntasks = MIN x T,
    # and Slurm 22.05 then allocates MIN nodes however many are free (measured on the test cluster;
    # without it `-N 1-2` gets both nodes when both are idle). --mincpus reserves T CPUs on every node
    # instead, and srun starts the T tasks per node.
    per_node = "--ntasks-per-node" if spec.min_nodes == spec.max_nodes else "--mincpus"
    options = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", f"{per_node}={spec.tasks_per_node}"]
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
        "TASKS_PER_NODE": str(spec.tasks_per_node),
        "MAX_REQUEUES": str(spec.max_requeues),
        "MAX_RESTARTS": str(spec.max_restarts),
    }
    for name, value in values.items():
        template = template.replace("{{" + name + "}}", value)
    return template
