"""The model a weight source describes, read from its config files alone (no tensors, no torch, no
checksums): what `gridtrain train` checks train.init_from against before any rank starts."""
from pathlib import Path

from gridtrain.convert.hf_config import model_config_from_hf
from gridtrain.errors import UserError
from gridtrain.train.checkpoint.manifest import MANIFEST_NAME, saved_model
from gridtrain.train.checkpoint.store import list_checkpoints


def source_model_config(path: str | Path):
    """Only the ModelConfig of the source at `path`, cheaply (no tensors, no checksums)."""
    path = Path(path)
    if (path / "config.json").exists():
        return model_config_from_hf(path)
    if not (path / MANIFEST_NAME).exists() and path.is_dir() and list_checkpoints(path):
        path = list_checkpoints(path)[-1][1]
    if not (path / MANIFEST_NAME).exists():
        raise UserError(f"{path}: neither a gridtrain checkpoint nor a Hugging Face model folder (config.json)")
    return saved_model(path)


def init_from_problems(model, path: str) -> list[tuple[str, object, str]]:
    """Why the run's model section cannot take the weights at `path` (train.init_from): each
    difference that changes a weight's shape or the function it computes, named with both values.
    A model vocab larger than the source's is fine (the extra rows keep their initialisation)."""
    try:
        theirs = source_model_config(path)
    except UserError as exc:
        return [("train.init_from", path, str(exc))]
    fields = ["family", "hidden_size", "num_layers", "num_attention_heads", "kv_heads", "ffn_size", "tied", "norm_eps"]
    fields += ["rope_theta"] if model.family == "llama" else ["max_seq_len"]
    problems = []
    for field in fields:
        mine, source = getattr(model, field), getattr(theirs, field)
        if mine != source:
            problems.append((f"model.{field}", mine, f"train.init_from={path} has {field} {source}; "
                             "set the model section to match it (`gridtrain convert PATH --to gridtrain` writes it)"))
    if theirs.vocab_size > model.vocab_size:
        problems.append(("model.vocab_size", model.vocab_size, f"train.init_from={path} has {theirs.vocab_size} "
                         "vocab rows; use at least as many"))
    return problems
