"""`gridtrain checkpoint inspect PATH`: step, data position, layout, sizes and validity of one
checkpoint or of every checkpoint in a folder. Reads only the manifest and gridtrain's state JSON
(plus the files themselves for checksums): no torch or deepspeed import, answers in about a second
plus the time to read the files."""
import json
import sys
from pathlib import Path

from gridtrain.launcher.errors import UserError
from gridtrain.train.checkpoint_manifest import MANIFEST_NAME, STATE_NAME, read_manifest, verify_checkpoint
from gridtrain.train.checkpoint_store import list_checkpoints, read_latest


def register(subparsers) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect checkpoints")
    sub = parser.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    inspect = sub.add_parser("inspect", help="print step, layout, sizes and validity of checkpoints")
    inspect.add_argument("path", help="a checkpoint (step_XXXXXXXX folder) or a folder of checkpoints")
    inspect.add_argument("--quick", action="store_true", help="check file sizes only, skip the sha256 pass")
    inspect.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of text")
    inspect.set_defaults(handler=inspect_command)


def _kind(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    if name.endswith("optim_states.pt"):
        return "optimizer"
    if name.endswith("model_states.pt"):
        return "model"
    return "other"


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
        sizes[_kind(rel)] += entry["size"]
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
