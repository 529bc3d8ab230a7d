"""`gridtrain checkpoint inspect PATH`: step, data position, layout, sizes and validity of one
checkpoint or of every checkpoint in a folder. Reads only the manifest and gridtrain's state JSON
(plus the files themselves for checksums): no torch or deepspeed import, answers in about a second
plus the time to read the files. `gridtrain checkpoint reshard` checks the new layout here and
spawns ranks (`gridtrain launch --reshard`) that do the work."""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from gridtrain.convert.output import publish_folder
from gridtrain.data.tokenizer import find_tokenizer
from gridtrain.errors import ConfigError, UserError
from gridtrain.launcher.config import load_config
from gridtrain.launcher.run_commands import resolve_device
from gridtrain.launcher.spawn import NodeSpec, RankFailed, spawn
from gridtrain.launcher.validate import validate
from gridtrain.outputs import check_output, creatable
from gridtrain.parallel.deepspeed_compat import check_deepspeed_version, checkpoint_file_kind
from gridtrain.parallel.layout import configured_world_size
from gridtrain.train.checkpoint.layout_change import reshard_refusal
from gridtrain.train.checkpoint.manifest import MANIFEST_NAME, STATE_NAME, read_manifest, verify_checkpoint
from gridtrain.train.checkpoint.store import checkpoint_folder_problem, list_checkpoints, read_latest


def register(subparsers) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect and reshard checkpoints")
    sub = parser.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    inspect = sub.add_parser("inspect", help="print step, layout, sizes and validity of checkpoints")
    inspect.add_argument("path", help="a checkpoint (step_XXXXXXXX folder) or a folder of checkpoints")
    inspect.add_argument("--quick", action="store_true", help="check file sizes only, skip the sha256 pass")
    inspect.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of text")
    inspect.set_defaults(handler=inspect_command)
    reshard = sub.add_parser(
        "reshard", help="write a checkpoint for another TP x PP x DP layout",
        description="Spawns the new layout's ranks on this node (validated like training ranks); each "
                    "loads its shard of PATH through DeepSpeed's universal form and saves into --out.")
    reshard.add_argument("path", help="the source checkpoint (a step_XXXXXXXX folder)")
    reshard.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the new layout")
    reshard.add_argument("--pp", type=int, required=True, help="pipeline-parallel size of the new layout")
    reshard.add_argument("--dp", type=int, required=True, help="data-parallel size of the new layout")
    reshard.add_argument("--zero", type=int, default=None,
                         help="ZeRO stage of the new layout (default: the saved one, at most 1 with --pp > 1)")
    reshard.add_argument("--out", required=True, help="checkpoint folder to write (resume with --resume-from OUT); "
                         "written aside and renamed into place when complete")
    reshard.add_argument("--force", action="store_true",
                         help="replace a non-empty --out if it is a folder of checkpoints (never the source's folder)")
    reshard.set_defaults(handler=reshard_command)


def describe(ckpt: Path, checksums: bool) -> dict:
    """Everything `inspect` shows about one checkpoint, as a JSON-ready dict."""
    info = {"path": str(ckpt), "valid": False, "problems": []}
    try:
        manifest = read_manifest(ckpt)
    except (OSError, ValueError) as exc:
        info["problems"] = [f"{ckpt / MANIFEST_NAME}: unreadable ({exc})"]
        return info
    sizes = {"model": 0, "optimizer": 0, "other": 0}
    for rel, entry in manifest["files"].items():
        sizes[checkpoint_file_kind(rel)] += entry["size"]
    try:
        state = json.loads((ckpt / STATE_NAME).read_text(encoding="utf-8"))["train_state"]
    except (OSError, ValueError, KeyError):
        state = {}
    problems = verify_checkpoint(ckpt, checksums=checksums)
    info.update(step=manifest["step"], consumed_samples=state.get("consumed_samples"),
                consumed_tokens=state.get("consumed_tokens"), layout=manifest["layout"],
                total_bytes=manifest["total_bytes"], files=len(manifest["files"]), bytes_by_kind=sizes,
                versions=manifest["versions"], valid=not problems, problems=problems,
                checked="sha256" if checksums else "sizes")
    return info


def _text(info: dict, latest: bool) -> str:
    head = f"{info['path']}{'  (latest)' if latest else ''}"
    if "step" not in info:
        return f"{head}\n  INVALID: {info['problems'][0]}"
    lay, mb = info["layout"], lambda n: f"{n / 1e6:,.2f} MB"  # noqa: E731
    kinds = info["bytes_by_kind"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    status = (f"valid ({info['checked']} of {info['files']} files checked)" if info["valid"] else
              f"INVALID: {info['problems'][0]}" + (f" (+{len(info['problems']) - 1} more)" if len(info["problems"]) > 1 else ""))
    return "\n".join([
        head,
        f"  step {info['step']} | consumed samples {info['consumed_samples']} | tokens {info['consumed_tokens']}",
        f"  layout: world {lay['world_size']} = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, "
        f"ZeRO {lay['zero_stage']}, {lay['dtype']}",
        f"  size: {mb(info['total_bytes'])} in {info['files']} files (model states {mb(kinds['model'])}, "
        f"optimizer states {mb(kinds['optimizer'])}, other {mb(kinds['other'])})",
        f"  versions: {versions}",
        f"  {status}",
    ])


def inspect_command(args) -> int:
    """Exit status 0 if every inspected checkpoint is valid, 1 if any is not."""
    path = Path(args.path)
    if (path / MANIFEST_NAME).exists() or (path.is_dir() and not list_checkpoints(path) and path.name.startswith("step_")):
        targets, latest = [path], read_latest(path.parent)
    elif path.is_dir() and list_checkpoints(path):
        targets, latest = [p for _, p in list_checkpoints(path)], read_latest(path)
    else:
        raise UserError(f"checkpoint inspect: {str(path)!r} is neither a checkpoint (a folder with "
                        f"{MANIFEST_NAME}) nor a folder of step_XXXXXXXX checkpoints; pass one of those")
    infos = [describe(target, checksums=not args.quick) for target in targets]
    for info in infos:
        if args.json:
            print(json.dumps(info, sort_keys=True))
        else:
            print(_text(info, latest == Path(info["path"]).name))
    sys.stdout.flush()
    return 0 if all(info["valid"] for info in infos) else 1


# What `checkpoint reshard` calls the config fields it sets, for messages about them.
_RESHARD_FLAGS = {"parallel.tensor_parallel": "--tp", "parallel.pipeline_parallel": "--pp",
                  "parallel.data_parallel": "--dp", "parallel.zero_stage": "--zero"}


def reshard_config(path: Path, args, out: Path) -> dict:
    """The saved run config with the new layout, resuming from `path` and saving into `out`."""
    if verify_checkpoint(path, checksums=False):
        raise UserError(f"checkpoint reshard: {path} is not a valid checkpoint (see `gridtrain checkpoint inspect {path}`)")
    config = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))["config"]
    saved_zero = config["parallel"]["zero_stage"]
    zero = args.zero if args.zero is not None else (min(saved_zero, 1) if args.pp > 1 else saved_zero)
    config["parallel"].update(tensor_parallel=args.tp, pipeline_parallel=args.pp, data_parallel=args.dp, zero_stage=zero)
    config["train"]["resume"] = str(path.resolve())
    config["checkpoint"]["dir"] = str(out.resolve())
    config["checkpoint"]["interval_steps"] = 0
    tokenizer = find_tokenizer(path)
    if tokenizer is not None:
        config["data"]["tokenizer"] = str(Path(tokenizer).resolve())
    return config


def _validated_layout(config_path: str, device: str):
    """The new layout through the launcher's validation, problems named by this command's flags."""
    cfg = load_config([config_path])
    try:
        return validate(cfg, configured_world_size(cfg.parallel), device)
    except ConfigError as exc:
        raise ConfigError([(_RESHARD_FLAGS.get(field, field), value, fix) for field, value, fix in exc.problems]) from None


def reshard_command(args) -> int:
    """Spawn the new layout's ranks on this node (the launcher's spawn: `gridtrain launch --reshard`);
    each validates the config, loads its shard of the source through DeepSpeed's universal form and
    saves natively into --out."""
    path = Path(args.path)
    if not (path / MANIFEST_NAME).exists():
        raise UserError(f"checkpoint reshard: {str(path)!r} is not a checkpoint (no {MANIFEST_NAME}); pass a step_XXXXXXXX folder")
    # The source's run folder of checkpoints counts as a source too: the new checkpoint's publish and
    # retention would replace or delete the checkpoints there.
    check_output(args.out, "--out", args.force, "folder of checkpoints", checkpoint_folder_problem,
                 sources=(path, path.parent))
    creatable(args.out, "--out")
    out = Path(args.out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    config = reshard_config(path, args, partial)
    device = resolve_device("auto", import_torch=False)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    try:
        layout = _validated_layout(fh.name, device)
        saved = read_manifest(path)["layout"]
        refusal = reshard_refusal(saved, {**layout.record(), "dtype": config["train"]["dtype"]}, path)
        if refusal:
            raise UserError(f"checkpoint reshard: {refusal}")
        check_deepspeed_version()
        spawn(NodeSpec(nnodes=1, nproc_per_node=layout.world_size), fh.name, device, launch_flags=("--reshard",))
        publish_folder(partial, out)
    except RankFailed as exc:
        print(f"gridtrain: error: checkpoint reshard failed: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        os.unlink(fh.name)
        shutil.rmtree(partial, ignore_errors=True)
    print(f"resharded {path} to TP {args.tp} x PP {args.pp} x DP {args.dp} in {args.out}")
    return 0
