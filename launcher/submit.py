"""`gridtrain submit`: validate a run for N nodes x G ranks on the job's device, render the batch
script (slurm/gridtrain.sbatch.template) into the run folder next to the resolved config, and hand
it to `sbatch`; `--chain K` submits K jobs, each starting after the previous one ends. Imports no
torch/deepspeed/megatron: it answers in about a second on a login node."""
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gridtrain.launcher.errors import ConfigError, UserError

TEMPLATE = "gridtrain.sbatch.template"
SITE_ENV = "site-env.sh"
SCRIPT_NAME = "gridtrain.sbatch"
LOG_PATTERN = "slurm-%j.out"  # %j: the job id (each array task has its own)
DEFAULT_SIGNAL_GRACE = 120  # seconds between USR1 and the time limit: enough to save a checkpoint
DEFAULT_MAX_REQUEUES = 3


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


def register(subparsers) -> None:
    sub = subparsers.add_parser(
        "submit", allow_abbrev=False, help="validate a run and submit it as a Slurm batch job (sbatch)",
        description="Validate CONFIG for --nodes x --gpus-per-node ranks on the job's device, write the "
                    "resolved config and the batch script into train.run_dir, and submit it with sbatch. "
                    "The job runs one rank per GPU (srun ... gridtrain launch), checkpoints and exits 75 on "
                    "Slurm's USR1 warning (--signal-grace seconds before the time limit, or "
                    "`scancel --signal=USR1 JOBID`), then requeues itself and resumes, up to --max-requeues times.")
    sub.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML files, merged in order")
    sub.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    sub.add_argument("--gpus-per-node", type=int,
                     help="GPUs per node, one rank each (--device cuda; default: the config's ranks / nodes)")
    sub.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                     help="the job's device, validated as such even on a GPU-less login node (default cuda)")
    sub.add_argument("--ntasks-per-node", type=int,
                     help="ranks per node for --device cpu (default: the config's ranks / nodes)")
    sub.add_argument("--partition", help="sbatch --partition")
    sub.add_argument("--time", help="sbatch --time, e.g. 24:00:00 (the USR1 warning comes --signal-grace before it)")
    sub.add_argument("--account", help="sbatch --account")
    sub.add_argument("--qos", help="sbatch --qos")
    sub.add_argument("--job-name", help="sbatch --job-name (default: the run folder's name)")
    sub.add_argument("--chain", type=int, default=1, metavar="K",
                     help="submit K jobs, each starting after the previous one ends (--dependency=afterany); "
                          "for runs longer than the time limit. A job with nothing left to train exits 0 at once")
    sub.add_argument("--signal-grace", type=int, default=DEFAULT_SIGNAL_GRACE, metavar="S",
                     help=f"seconds before the time limit at which Slurm sends USR1 to every rank "
                          f"(--signal=USR1@S, default {DEFAULT_SIGNAL_GRACE}): long enough to save a checkpoint")
    sub.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES, metavar="R",
                     help=f"requeue a stopped job at most R times (default {DEFAULT_MAX_REQUEUES}; 0: never); "
                          "stops requeue loops")
    sub.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                     help="extra sbatch option written as an #SBATCH line, e.g. --sbatch-arg=--exclusive (repeatable)")
    sub.add_argument("--site-env", metavar="PATH",
                     help="shell file the job sources first (modules, NCCL, paths; default: slurm/site-env.sh)")
    sub.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    sub.epilog = "Overrides: --section.field=value, as for `gridtrain train`"
    sub.set_defaults(handler=submit_command, accepts_overrides=True)


def submit_command(args) -> int:
    from gridtrain.launcher.commands import RESOLVED_CONFIG, split_extra_args
    from gridtrain.launcher.config import load_config, write_config

    configs, overrides = split_extra_args(args)
    cfg = load_config(configs, overrides)
    tasks = ranks_per_node(cfg, args)
    check_job(cfg, args.nodes, tasks, args.device)
    run_dir = Path(cfg.train.run_dir).resolve()
    spec = JobSpec(
        nodes=args.nodes, tasks_per_node=tasks, device=args.device,
        job_name=args.job_name or run_dir.name, log=run_dir / LOG_PATTERN, workdir=Path.cwd(),
        signal_grace=args.signal_grace, max_requeues=args.max_requeues, partition=args.partition,
        time=args.time, account=args.account, qos=args.qos, extra=tuple(args.sbatch_arg))
    config_path = run_dir / RESOLVED_CONFIG
    site_env = Path(args.site_env).resolve() if args.site_env else package_file(SITE_ENV)
    if not site_env.is_file():
        raise UserError(f"--site-env {args.site_env}: no such file; give the site environment file the job should source")
    script = render_script(spec, config_path, site_env)
    if args.dry_run:
        print(script, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch is not on PATH: run `gridtrain submit` where Slurm's commands are (a login "
                        "node), or add --dry-run to see the batch script without submitting")
    write_config(cfg, config_path)
    script_path = run_dir / SCRIPT_NAME
    script_path.write_text(script)
    previous = None
    for _ in range(args.chain):
        job_id = call_sbatch(sbatch, script_path, previous)
        print(f"gridtrain: submitted job {job_id} ({spec.nodes} node(s) x {spec.tasks_per_node} rank(s), "
              f"{spec.device}{f', after job {previous}' if previous else ''}): "
              f"log {str(spec.log).replace('%j', job_id)}", flush=True)
        previous = job_id
    return 0


def ranks_per_node(cfg, args) -> int:
    """Ranks per node from the flag that fits the device, else the config's ranks / nodes."""
    from gridtrain.parallel.layout import configured_world_size

    if args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: must be >= 1")
    if args.chain < 1 or args.max_requeues < 0 or args.signal_grace < 0:
        raise UserError(f"--chain {args.chain} / --max-requeues {args.max_requeues} / --signal-grace "
                        f"{args.signal_grace}: need chain >= 1, max-requeues >= 0, signal-grace >= 0")
    # One rank per GPU on CUDA; --ntasks-per-node says how many CPU ranks.
    flags = {"--gpus-per-node": args.gpus_per_node, "--ntasks-per-node": args.ntasks_per_node}
    given = "--gpus-per-node" if args.device == "cuda" else "--ntasks-per-node"
    [other] = set(flags) - {given}
    per_node, stray = flags[given], flags[other]
    if stray is not None:
        raise UserError(f"{other} does not apply to --device {args.device}: give {given} (ranks per node)")
    if per_node is None:
        ranks = configured_world_size(cfg.parallel)
        if ranks % args.nodes:
            raise UserError(f"--nodes {args.nodes}: the config's layout has {ranks} ranks, not a multiple of the "
                            f"node count; give {given}")
        per_node = ranks // args.nodes
    if per_node < 1:
        raise UserError(f"{given} {per_node}: must be >= 1")
    return per_node


def check_job(cfg, nodes: int, tasks_per_node: int, device: str) -> None:
    """The launch-time validation for nodes x tasks ranks on `device`, named after the flags, plus
    what a requeued job needs: checkpoints."""
    from gridtrain.launcher.validate import validate

    world = nodes * tasks_per_node
    try:
        validate(cfg, world, device)
    except ConfigError as exc:
        flag = "--gpus-per-node" if device == "cuda" else "--ntasks-per-node"
        problems = [(f"--nodes {nodes} x {flag} {tasks_per_node} = {world} ranks: {field}", value, fix)
                    if field == "world_size" else (field, value, fix) for field, value, fix in exc.problems]
        raise ConfigError(problems) from None
    if cfg.checkpoint.interval_steps == 0 and cfg.checkpoint.interval_minutes == 0:
        raise ConfigError([("checkpoint.interval_steps", 0, "a Slurm job must checkpoint to be requeued, chained "
                            "or told it has finished: set checkpoint.interval_steps (or interval_minutes) > 0")])


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


def call_sbatch(sbatch: str, script: Path, after: str | None) -> str:
    """Submit `script`; returns the job id. `after`: start only once that job has ended."""
    cmd = [sbatch, "--parsable"] + ([f"--dependency=afterany:{after}"] if after else []) + [str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise UserError(f"sbatch refused the job: {message}")
    return result.stdout.strip().split(";")[0]  # "<id>[;<cluster>]"
