"""`gridtrain train`, `gridtrain launch` and `gridtrain env`.

Lazy imports: torch, DeepSpeed and megatron-core (the trainer, the elastic agent, the device report)
cost about 6 s per process (measured; shared/DESIGN.md), so they are imported inside the handlers
that run them and `--help` or `train --dry-run` answer in about a second."""
import argparse
import os
import shutil
import socket
import sys
from dataclasses import replace
from pathlib import Path

from gridtrain.errors import UserError
from gridtrain.launcher.config import load_config, write_config
from gridtrain.launcher.dryrun import report
from gridtrain.launcher.env_report import env_report
from gridtrain.launcher.preflight import check_inputs
from gridtrain.launcher.rank_env import discover, port_in_use
from gridtrain.launcher.spawn import NodeSpec, RankFailed, set_rank_environment, spawn
from gridtrain.launcher.validate import validate
from gridtrain.parallel.deepspeed_compat import check_deepspeed_version
from gridtrain.parallel.layout import configured_world_size
from gridtrain.train.checkpoint.store import checkpoint_dir, list_checkpoints
from gridtrain.train.preemption import PREEMPTED_EXIT_CODE, catch_early
from gridtrain.train.restarts import Attempt, newest_step, refusal

RESOLVED_CONFIG = "resolved-config.yaml"


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", allow_abbrev=False, help="validate a config and train it on local (or several) nodes",
        description="Compose CONFIG files (later wins), apply --section.field=value overrides, validate, "
                    "then spawn the ranks of this node with torch's elastic agent.")
    _config_arguments(train)
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved config and derived numbers (size, FLOPs, memory), no training")
    train.add_argument("--nproc-per-node", type=int, help="ranks on this node (default: the config's layout / nnodes)")
    train.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    train.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    train.add_argument("--master-addr", help="host of node 0 (required with --nnodes > 1)")
    train.add_argument("--master-port", type=int, help="free port on node 0 (required with --nnodes > 1)")
    train.add_argument("--resume-from", metavar="PATH", help="resume from this checkpoint (sets train.resume)")
    train.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    train.add_argument("--max-restarts", type=int, default=0, metavar="N",
                       help="when a rank dies, stop the others and start all ranks again from the newest checkpoint, "
                            "at most N times (default 0); a failure that comes again before a new checkpoint is not "
                            "restarted, nor is bad input (exit 2)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="device to validate for (auto: CUDA if present; for --dry-run also when the "
                            "config asks for parallel.backend: nccl, so a GPU preset checks as CUDA on a login node)")
    train.set_defaults(handler=train_command)

    launch = subparsers.add_parser(
        "launch", allow_abbrev=False, help="per-rank entry point (under torchrun, srun or mpirun)",
        description="Run one rank: discover RANK/WORLD_SIZE from torchrun, Slurm or MPI, validate "
                    "against the real world size, then train.")
    _config_arguments(launch)
    # The ranks `gridtrain checkpoint reshard` spawns: the same discovery and validation, then
    # resume + save instead of training.
    launch.add_argument("--reshard", action="store_true", help=argparse.SUPPRESS)
    launch.set_defaults(handler=launch_command)

    env = subparsers.add_parser("env", help="versions, backend, devices and optional kernels of this machine")
    env.set_defaults(handler=env_command)


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML files, merged in order")
    parser.epilog = "Overrides: --section.field=value (YAML scalar rules), e.g. --train.steps=100 --optim.lr=1e-3"
    parser.set_defaults(accepts_overrides=True)


def split_extra_args(args) -> tuple[list[str], list[str]]:
    """(config paths, overrides): argparse leaves --section.field=value (and any config path
    given after one) in args.extra_args, except overrides whose value has a space, which it takes
    for positionals."""
    configs, overrides = [], []
    for arg in [*args.configs, *getattr(args, "extra_args", [])]:
        if arg.startswith("--"):
            overrides.append(arg)
        else:
            configs.append(arg)
    return configs, overrides


def _load(args, extra_overrides=(), notes=None):
    configs, overrides = split_extra_args(args)
    return load_config(configs, overrides + list(extra_overrides), notes)


def _resume_overrides(args) -> list[str]:
    if args.resume_from and args.no_resume:
        raise UserError("--resume-from and --no-resume contradict each other; give one")
    if args.resume_from:
        return [f"train.resume={args.resume_from}"]
    return ["train.resume=none"] if args.no_resume else []


def _layout_world(cfg, args) -> tuple[int, int]:
    """(nproc per node, world size) from the flags, else from the config's layout."""
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--nnodes {args.nnodes} / --node-rank {args.node_rank}: need nnodes >= 1 and 0 <= node-rank < nnodes")
    nproc = args.nproc_per_node
    if nproc is None:
        ranks = configured_world_size(cfg.parallel)
        if ranks % args.nnodes:
            raise UserError(f"--nnodes {args.nnodes}: the config's layout has {ranks} ranks, not a multiple "
                            "of the node count; give --nproc-per-node")
        nproc = ranks // args.nnodes
    if nproc < 1:
        raise UserError(f"--nproc-per-node {nproc}: must be >= 1")
    return nproc, nproc * args.nnodes


def check_cuda_visible() -> None:
    """--device cuda (or a config that needs it) on a host whose torch sees no GPU: one line now,
    not N ranks failing in their process-group set-up."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device on this host (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run on a GPU node, or use --device cpu")


def resolve_device(choice: str, import_torch: bool) -> str:
    if choice != "auto":
        return choice
    if not import_torch:  # dry-run: stay torch-free; the NVIDIA driver's device node says enough
        return "cuda" if os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_command(args) -> int:
    notes: list[str] = []
    cfg = _load(args, _resume_overrides(args), notes)
    nproc, world = _layout_world(cfg, args)
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts {args.max_restarts}: must be >= 0 (0: a failed rank ends the run)")
    # Probe without torch: a bad config must fail in a second, before any heavy import. A dry run of
    # an NCCL config is a GPU job checked from wherever the user is (a login node has no GPU).
    gpu_job = args.dry_run and args.device == "auto" and cfg.parallel.backend == "nccl"
    device = "cuda" if gpu_job else resolve_device(args.device, import_torch=False)
    layout = validate(cfg, world, device)
    check_inputs(cfg)
    if args.dry_run:
        print(report(cfg, layout, notes), end="")
        return 0
    check_deepspeed_version()
    if device == "cuda":
        check_cuda_visible()
    if args.nnodes > 1 and args.node_rank == 0 and args.master_port and port_in_use(args.master_port):
        raise UserError(f"--master-port {args.master_port}: the port is in use on this host (node 0, where the "
                        "ranks meet); pick a free port, the same on every node")

    # Every rank reads this one file, so all ranks train the identical resolved config.
    path = write_config(cfg, Path(cfg.train.run_dir) / RESOLVED_CONFIG)
    node = NodeSpec(args.nnodes, nproc, args.node_rank, args.master_addr, args.master_port)
    print(f"gridtrain: node {args.node_rank}/{args.nnodes}: {nproc} rank(s) on {device}, world {world}, config {path}",
          file=sys.stderr, flush=True)
    return train_with_restarts(cfg, node, path, device, args.max_restarts)


def train_with_restarts(cfg, node: NodeSpec, path: Path, device: str, max_restarts: int) -> int:
    """Spawn the ranks until they finish, stop for preemption (75), or fail in a way the restart
    policy (gridtrain.train.restarts) does not restart; every restart starts from the newest checkpoint."""
    ckpt_dir = checkpoint_dir(cfg.checkpoint, cfg.train.run_dir)
    attempt = Attempt(restarts=0, started_at=newest_step(ckpt_dir))
    while True:
        try:
            spawn(node, str(path), device)
            return 0
        except RankFailed as exc:
            if exc.exit_code == PREEMPTED_EXIT_CODE:  # a clean stop, not an error
                print(f"gridtrain: {exc}", file=sys.stderr)
                return exc.exit_code
            reached = newest_step(ckpt_dir)
            why = refusal(attempt, exc.exit_code, reached, max_restarts, "--max-restarts")
            if why:
                print(f"gridtrain: error: {exc}" + (f"; {why}" if max_restarts else ""), file=sys.stderr)
                return exc.exit_code
            failure = str(exc)
        print(f"gridtrain: {failure}; restart {attempt.restarts + 1} of at most {max_restarts}: every rank starts again "
              f"from the newest checkpoint (step {reached})", file=sys.stderr, flush=True)
        if cfg.train.resume != "auto" and reached > attempt.started_at:
            # --resume-from or --no-resume chose where the first attempt began; a restart goes on
            # from what this run has saved since.
            cfg = replace(cfg, train=replace(cfg.train, resume=str(list_checkpoints(ckpt_dir)[-1][1])))
            write_config(cfg, path)
        attempt = Attempt(restarts=attempt.restarts + 1, started_at=reached)


def launch_command(args) -> int:
    # Started by srun or mpirun, a preemption signal during the imports below (the trainer's,
    # seconds long) must not kill the rank. Under torchrun it must: the agent stops the other
    # ranks with SIGTERM when one fails.
    if "RANK" not in os.environ and not args.reshard:
        catch_early()
    cfg = _load(args)
    ranks = discover()
    # Under srun / mpirun rank 0 serves the rendezvous store on MASTER_PORT (torchrun's agent serves
    # its own): a port already taken would leave every rank waiting for a store that never starts.
    if ranks.rank == 0 and ranks.source in ("slurm", "mpi") and port_in_use(ranks.master_port):
        raise UserError(f"MASTER_PORT={ranks.master_port}: the port is in use on {socket.gethostname()} (rank 0 "
                        "serves the rendezvous there); export MASTER_PORT=<a free port> in the job script")
    # Under srun/mpirun nobody else sets the per-rank thread count or NCCL settings; before torch loads.
    set_rank_environment(resolve_device("auto", import_torch=False))
    layout = validate(cfg, ranks.world_size, resolve_device("auto", import_torch=True))
    from torch.distributed.elastic.multiprocessing.errors import record

    from gridtrain.convert.sources import open_weights
    from gridtrain.train.loop import reshard, run

    # record() writes a crashing rank's traceback where the elastic agent reports it from.
    if args.reshard:
        return int(record(reshard)(cfg, layout) or 0)
    # The files every rank reads, checked again here: ranks started by srun or mpirun had no
    # `gridtrain train` to check them before they started.
    check_inputs(cfg)
    return int(record(run)(cfg, layout, open_weights) or 0)


def env_command(args) -> int:
    """The report; exit 2 when a row is an error (an impossible rank environment)."""
    rows = env_report()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 2 if any(value.startswith("error: ") for _, value in rows) else 0
