"""Where full model weights come from: a gridtrain checkpoint (one step_* folder, or a folder of
them: the newest valid one) or a Hugging Face folder. Both answer the same questions: `model`
(the ModelConfig), `names()`, `shape(name)`, `tensor(name)` (full fp32, vocab unpadded, gridtrain
names) and `tokenizer` (a SentencePiece .model path, or None)."""
from pathlib import Path

from gridtrain.launcher.errors import UserError
from gridtrain.train.checkpoint.manifest import MANIFEST_NAME, verify_checkpoint
from gridtrain.train.checkpoint.store import CheckpointError, find_resumable, list_checkpoints


def resolve_checkpoint(path: Path, verify=verify_checkpoint) -> Path:
    """The checkpoint `path` names, its manifest verified (sizes and sha256 of every file, by
    `verify(path) -> problems`): a step_* folder, or the newest valid checkpoint of a folder."""
    path = Path(path)
    if (path / MANIFEST_NAME).exists():
        problems = verify(path)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"{path}: not a valid checkpoint: {problems[0]}{more}; "
                                  "see `gridtrain checkpoint inspect` and pick another step")
        return path
    if path.is_dir() and list_checkpoints(path):
        return find_resumable(path, verify=verify, what=f"{path}")
    raise UserError(f"{path}: neither a checkpoint (a step_* folder with {MANIFEST_NAME}), a folder of "
                    "checkpoints, nor a Hugging Face model folder (config.json); give one of those")


def open_weights(path: str | Path, trust_pickle: bool = False, verify=verify_checkpoint):
    """The weight source at `path` (see the module docstring); a checkpoint is checked by
    `verify` first (the trainer's ranks share the reading)."""
    path = Path(path)
    if (path / "config.json").exists():
        from gridtrain.convert.hf_import import HFWeights

        source = HFWeights(path, trust_pickle)
        model = path / "tokenizer.model"
    else:
        from gridtrain.train.checkpoint.weights import CheckpointWeights

        source = CheckpointWeights(resolve_checkpoint(path, verify))
        model = source.path / "tokenizer.model"
    source.tokenizer = str(model) if model.exists() else None
    return source


def source_model_config(path: str | Path):
    """Only the ModelConfig of the source at `path`, cheaply (no tensors, no checksums)."""
    path = Path(path)
    if (path / "config.json").exists():
        from gridtrain.convert.hf_config import model_config_from_hf

        return model_config_from_hf(path)
    from gridtrain.train.checkpoint.manifest import saved_model

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
