"""`gridtrain submit` and `gridtrain slurm-job`: the command-line side of gridtrain.slurm.

submit validates a run for N nodes x G ranks on the job's device, renders the batch script into the
run folder next to the resolved config, and hands it to `sbatch`; `--chain K` submits K jobs, each
starting after the previous one ends. slurm-job (left out of `gridtrain --help`) is what that
batch script runs before and after its ranks. Imports no torch/deepspeed/megatron: both answer in
about a second on a login node or a batch node."""
import os
import shutil
from pathlib import Path

from gridtrain.errors import ConfigError, UserError
from gridtrain.launcher.config import load_config, write_config
from gridtrain.launcher.preflight import check_inputs
from gridtrain.launcher.run_commands import RESOLVED_CONFIG, split_extra_args
from gridtrain.launcher.validate import validate
from gridtrain.parallel.layout import configured_world_size
from gridtrain.slurm import job
from gridtrain.slurm.batch_script import (
    LOG_PATTERN,
    SCRIPT_NAME,
    SITE_ENV,
    JobSpec,
    package_file,
    render_script,
    spec_problems,
)
from gridtrain.slurm.client import call_sbatch

DEFAULT_SIGNAL_GRACE = 120  # seconds between USR1 and the time limit: enough to save a checkpoint
DEFAULT_MAX_REQUEUES = 3
DEFAULT_MAX_RESTARTS = 3


def register(subparsers) -> None:
    sub = subparsers.add_parser(
        "submit", allow_abbrev=False, help="validate a run and submit it as a Slurm batch job (sbatch)",
        description="Validate CONFIG for --nodes x --gpus-per-node ranks on the job's device, write the "
                    "resolved config and the batch script into train.run_dir, and submit it with sbatch. "
                    "The job runs one rank per GPU (srun ... gridtrain launch), checkpoints and exits 75 on "
                    "Slurm's USR1 warning (--signal-grace seconds before the time limit, or "
                    "`scancel --signal=USR1 JOBID`), then requeues itself and resumes, up to --max-requeues times.")
    sub.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML files, merged in order")
    sub.add_argument("--nodes", default="1", metavar="N|MIN-MAX",
                     help="nodes (default 1); MIN-MAX (Slurm's -N min-max) starts on what the cluster has free, and "
                          "a requeued job resumes on however many it gets, with DP = ranks / (TP x PP) and the "
                          "same global batch: parallel.data_parallel must be auto")
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
    sub.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, metavar="N",
                     help=f"requeue a job whose rank or node failed at most N times (default {DEFAULT_MAX_RESTARTS}; "
                          "counted apart from --max-requeues); not after bad input (exit 2), nor after an attempt "
                          "that saved no new checkpoint")
    sub.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                     help="extra sbatch option written as an #SBATCH line, e.g. --sbatch-arg=--exclusive (repeatable)")
    sub.add_argument("--site-env", metavar="PATH",
                     help="shell file the job sources first (modules, NCCL, paths; default: slurm/site-env.sh)")
    sub.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    sub.epilog = "Overrides: --section.field=value, as for `gridtrain train`"
    sub.set_defaults(handler=submit_command, accepts_overrides=True)

    # No help=: argparse then leaves the command out of `gridtrain --help`.
    steps = subparsers.add_parser("slurm-job", description="Steps of the batch script of `gridtrain submit`.")
    steps.add_argument("step", choices=("start", "end"))
    steps.add_argument("config", metavar="CONFIG", help="the resolved config the job trains")
    steps.add_argument("--status", type=int, default=0, help="end: the exit status of srun")
    steps.add_argument("--ranks-per-node", type=int, help="start: the ranks srun starts on each node")
    steps.add_argument("--max-requeues", type=int, default=0, help="end: requeue a preempted job at most this many times")
    steps.add_argument("--max-restarts", type=int, default=0, help="end: requeue a failed job at most this many times")
    steps.add_argument("--since", type=int, default=0, help="end: the newest checkpoint's step when the ranks started")
    steps.set_defaults(handler=slurm_job_command)


def submit_command(args) -> int:
    configs, overrides = split_extra_args(args)
    cfg = load_config(configs, overrides)
    min_nodes, max_nodes = parse_nodes(args.nodes)
    tasks = ranks_per_node(cfg, args, max_nodes)
    for nodes in range(min_nodes, max_nodes + 1):
        check_job(cfg, nodes, tasks, args.device, ranged=min_nodes < max_nodes)
    check_inputs(cfg)
    run_dir = Path(cfg.train.run_dir).resolve()
    spec = JobSpec(
        min_nodes=min_nodes, max_nodes=max_nodes, tasks_per_node=tasks, device=args.device,
        job_name=args.job_name or run_dir.name, log=run_dir / LOG_PATTERN, workdir=Path.cwd(),
        signal_grace=args.signal_grace, max_requeues=args.max_requeues, max_restarts=args.max_restarts,
        partition=args.partition,
        time=args.time, account=args.account, qos=args.qos, extra=tuple(args.sbatch_arg))
    problems = spec_problems(spec)
    if problems:
        raise UserError("; ".join(problems))
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


def parse_nodes(text: str) -> tuple[int, int]:
    """(min, max) of --nodes N or MIN-MAX, as sbatch reads it."""
    low, dash, high = text.partition("-")
    if not (low.isdigit() and (high.isdigit() or not dash)):
        raise UserError(f"--nodes {text}: not a node count; give N or MIN-MAX, e.g. --nodes 4 or --nodes 2-4")
    nodes = (int(low), int(high or low))
    if nodes[0] < 1:
        raise UserError(f"--nodes {text}: a job runs on at least one node; e.g. --nodes 1 or --nodes 1-{max(nodes[1], 2)}")
    if nodes[0] > nodes[1]:
        raise UserError(f"--nodes {text}: MIN above MAX; give --nodes {nodes[1]}-{nodes[0]}")
    return nodes


def ranks_per_node(cfg, args, max_nodes: int) -> int:
    """Ranks per node from the flag that fits the device, else the config's ranks / the most nodes."""
    if args.chain < 1 or args.max_requeues < 0 or args.signal_grace < 0 or args.max_restarts < 0:
        raise UserError(f"--chain {args.chain} / --max-requeues {args.max_requeues} / --max-restarts "
                        f"{args.max_restarts} / --signal-grace {args.signal_grace}: need chain >= 1, max-requeues "
                        ">= 0, max-restarts >= 0, signal-grace >= 0")
    # One rank per GPU on CUDA; --ntasks-per-node says how many CPU ranks.
    flags = {"--gpus-per-node": args.gpus_per_node, "--ntasks-per-node": args.ntasks_per_node}
    given = "--gpus-per-node" if args.device == "cuda" else "--ntasks-per-node"
    [other] = set(flags) - {given}
    per_node, stray = flags[given], flags[other]
    if stray is not None:
        raise UserError(f"{other} does not apply to --device {args.device}: give {given} (ranks per node)")
    if per_node is None:
        ranks = configured_world_size(cfg.parallel)
        if ranks % max_nodes:
            raise UserError(f"--nodes {args.nodes}: the config's layout has {ranks} ranks, not a multiple of the "
                            f"node count; give {given}")
        per_node = ranks // max_nodes
    if per_node < 1:
        raise UserError(f"{given} {per_node}: must be >= 1")
    return per_node


def check_job(cfg, nodes: int, tasks_per_node: int, device: str, ranged: bool = False) -> None:
    """The launch-time validation for nodes x tasks ranks on `device`, named after the flags, plus
    what a requeued job needs: checkpoints. `ranged`: one node count of --nodes MIN-MAX, said so."""
    world = nodes * tasks_per_node
    try:
        validate(cfg, world, device)
    except ConfigError as exc:
        flag = "--gpus-per-node" if device == "cuda" else "--ntasks-per-node"
        where = f"--nodes {nodes}{' (in the range)' if ranged else ''} x {flag} {tasks_per_node} = {world} ranks: "
        problems = [(f"{where}{field}", value, fix) if field == "world_size" or ranged else (field, value, fix)
                    for field, value, fix in exc.problems]
        raise ConfigError(problems) from None
    if cfg.checkpoint.interval_steps == 0 and cfg.checkpoint.interval_minutes == 0:
        raise ConfigError([("checkpoint.interval_steps", 0, "a Slurm job must checkpoint to be requeued, chained "
                            "or told it has finished: set checkpoint.interval_steps (or interval_minutes) > 0")])


def slurm_job_command(args) -> int:
    cfg = load_config([args.config])
    if args.step == "start":
        return job.start(cfg, os.environ, args.ranks_per_node)
    return job.end(cfg, args.status, args.max_requeues, os.environ, args.max_restarts, args.since)
