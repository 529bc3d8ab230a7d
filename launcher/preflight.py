"""Checks of the files a run reads and writes, done by `gridtrain train` (and its --dry-run),
`gridtrain submit` and every rank of `gridtrain launch` before any rank starts, so a wrong path
costs a second, not a spawn of N ranks and their imports."""
from pathlib import Path

from gridtrain.convert.source_config import init_from_problems
from gridtrain.data.config import finetune_problems, missing_shard_problems
from gridtrain.data.tokenizer import tokenizer_vocab_size
from gridtrain.errors import ConfigError, UserError
from gridtrain.outputs import creatable
from gridtrain.train.checkpoint.store import checkpoint_dir
from gridtrain.train.run_config import RunConfig


def check_inputs(cfg: RunConfig) -> None:
    """Raise one ConfigError for a missing/unreadable tokenizer, a tokenizer larger than
    model.vocab_size, blend prefixes without PREFIX.bin + PREFIX.idx, a fine-tuning blend that
    breaks its rules (text shards in it, a loss mask missing), a train.init_from without
    weights or whose model differs from the model section, a train.resume path that does not
    exist, and a run folder (or checkpoint folder) that cannot be created or written."""
    problems = output_problems(cfg)
    tokenizer = cfg.data.tokenizer
    if tokenizer:
        try:
            pieces = tokenizer_vocab_size(tokenizer)
        except UserError as exc:
            problems.append(("data.tokenizer", tokenizer, str(exc).split(": ", 1)[-1]))
        else:
            if pieces > cfg.model.vocab_size:
                problems.append(("model.vocab_size", cfg.model.vocab_size, f"the tokenizer {tokenizer} has {pieces} "
                                 f"tokens; set model.vocab_size to at least {pieces}"))
    missing = missing_shard_problems(cfg.data.blend)
    problems += missing or finetune_problems(cfg.data.blend)
    if cfg.train.init_from:
        problems += init_from_problems(cfg.model, cfg.train.init_from)
    if cfg.train.resume not in ("auto", "none") and not Path(cfg.train.resume).exists():
        problems.append(("train.resume", cfg.train.resume, "no such checkpoint or folder (--resume-from); give a "
                         "step_XXXXXXXX folder or a folder of them, or use auto / none"))
    if problems:
        raise ConfigError(problems)


def output_problems(cfg: RunConfig) -> list[tuple[str, object, str]]:
    """train.run_dir and checkpoint.dir must be folders this user can create or write."""
    problems = []
    for field, path in (("train.run_dir", cfg.train.run_dir),
                        ("checkpoint.dir", str(checkpoint_dir(cfg.checkpoint, cfg.train.run_dir)))):
        if Path(path).exists() and not Path(path).is_dir():
            problems.append((field, path, "is a file; name a folder"))
            continue
        try:
            creatable(Path(path) / "x", field)
        except UserError as exc:
            problems.append((field, path, str(exc).split(": ", 1)[-1]))
    return problems
