"""The `gridtrain` command. The launcher's *_commands modules each register a group of subcommands;
this module only wires them and turns user errors into one line and exit status 2. Nothing heavy is
imported here, so `--help` and `--dry-run` answer in about a second."""
import argparse
import difflib
import re
import sys

from gridtrain.errors import UserError
from gridtrain.launcher import checkpoint_commands, convert_commands, data_commands, demo, run_commands, slurm_commands

# Modules exposing `register(subparsers)`; each imports torch/deepspeed only inside its handlers.
COMMAND_MODULES = (
    run_commands,  # train, launch, env
    slurm_commands,  # submit, slurm-job (hidden: the batch script's steps)
    data_commands,  # tokenizer, preprocess, data
    checkpoint_commands,  # checkpoint
    convert_commands,  # convert, generate
    demo,  # demo
)


class Parser(argparse.ArgumentParser):
    """argparse with gridtrain's error line: `gridtrain[ COMMAND]: error: ...`, exit 2, no usage
    block (`--help` shows it); an unknown command is answered from the public commands only."""

    public_commands: tuple = ()

    def error(self, message: str):
        unknown = re.match(r"argument COMMAND: invalid choice: '(.*)' \(choose from", message)
        if unknown:
            close = difflib.get_close_matches(unknown.group(1), self.public_commands, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = (f"unknown command {unknown.group(1)!r}; {hint}commands: {', '.join(self.public_commands)} "
                       "(gridtrain --help)")
        else:
            message += f"; see `{self.prog} --help`"
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gridtrain", description="Distributed training of GPT-2 / Llama decoders (TP x PP x DP, ZeRO).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    # The batch script's own steps (registered without help) stay out of help and suggestions.
    parser.public_commands = tuple(action.dest for action in sub._choices_actions)
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
