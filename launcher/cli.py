"""The `gridtrain` command. Each package registers its own subcommands; this module only wires
them and turns user errors into one line and exit status 2. Nothing heavy is imported here, so
`--help` and `--dry-run` answer in about a second."""
import argparse
import importlib
import sys

from gridtrain.launcher.errors import UserError

# Modules exposing `register(subparsers)`; each imports torch/deepspeed only inside its handlers.
COMMAND_MODULES = (
    "gridtrain.launcher.commands",  # train, launch, env
    "gridtrain.launcher.submit",  # submit
    "gridtrain.launcher.slurm_job",  # slurm-job (hidden: the batch script's steps)
    "gridtrain.data.commands",  # tokenizer, preprocess, data
    "gridtrain.train.checkpoint.commands",  # checkpoint
    "gridtrain.convert.commands",  # convert, generate
    "gridtrain.launcher.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gridtrain",
        description="Distributed training of GPT-2 / Llama decoders (TP x PP x DP, ZeRO).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    # Config overrides (--section.field=value) are not argparse options: commands that take them
    # set accepts_overrides and receive them in args.extra_args.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"gridtrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
