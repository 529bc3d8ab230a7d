"""Checks of the files a run reads, done by `gridtrain train` before any rank starts (so a wrong
path costs a second, not a spawn of N ranks and their imports). Not part of --dry-run, which
describes a config for a cluster whose data need not exist here."""
from gridtrain.convert.source_config import init_from_problems
from gridtrain.data.config import missing_shard_problems
from gridtrain.data.spm_model import load_processor
from gridtrain.errors import ConfigError, UserError
from gridtrain.train.run_config import RunConfig


def check_inputs(cfg: RunConfig) -> None:
    """Raise one ConfigError for a missing/unreadable tokenizer, a tokenizer larger than
    model.vocab_size, blend prefixes without PREFIX.bin + PREFIX.idx, and a train.init_from whose
    model differs from the model section."""
    problems = []
    tokenizer = cfg.data.tokenizer
    if tokenizer:
        try:
            pieces = load_processor(tokenizer).GetPieceSize()
        except UserError as exc:
            problems.append(("data.tokenizer", tokenizer, str(exc).split(": ", 1)[-1]))
        else:
            if pieces > cfg.model.vocab_size:
                problems.append(("model.vocab_size", cfg.model.vocab_size, f"the tokenizer {tokenizer} has {pieces} "
                                 f"pieces; set model.vocab_size to at least {pieces}"))
    problems += missing_shard_problems(cfg.data.blend)
    if cfg.train.init_from:
        problems += init_from_problems(cfg.model, cfg.train.init_from)
    if problems:
        raise ConfigError(problems)
