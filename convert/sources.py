"""Where full model weights come from: a gridtrain checkpoint (one step_* folder, or a folder of
them: the newest valid one) or a Hugging Face folder. Both answer the same questions: `model`
(the ModelConfig), `names()`, `shape(name)`, `tensor(name)` (full fp32, vocab unpadded, gridtrain
names) and `tokenizer` (the tokenizer path the source carries, for gridtrain.data.tokenizer, or None)."""
from pathlib import Path

from gridtrain.convert.hf_import import HFWeights
from gridtrain.data.tokenizer import find_tokenizer
from gridtrain.errors import UserError
from gridtrain.model.naming import split_name
from gridtrain.train.checkpoint.manifest import MANIFEST_NAME, verify_checkpoint
from gridtrain.train.checkpoint.store import CheckpointError, find_resumable, list_checkpoints
from gridtrain.train.checkpoint.weights import CheckpointWeights


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
        return find_resumable(path, verify=verify, what=f"{path}",
                              fix="restore the files, or give one of its valid step_XXXXXXXX folders (see "
                                  f"`gridtrain checkpoint inspect {path}`)")
    raise UserError(f"{path}: neither a checkpoint (a step_* folder with {MANIFEST_NAME}), a folder of "
                    "checkpoints, nor a Hugging Face model folder (config.json); give one of those")


def open_weights(path: str | Path, trust_pickle: bool = False, verify=verify_checkpoint):
    """The weight source at `path` (see the module docstring); a checkpoint is checked by
    `verify` first (the trainer's ranks share the reading)."""
    path = Path(path)
    if (path / "config.json").exists():
        source = HFWeights(path, trust_pickle)
    else:
        source = CheckpointWeights(resolve_checkpoint(path, verify))
    source.tokenizer = find_tokenizer(source.path)
    return source


def layer_names(source) -> dict[int, list[str]]:
    """The source's gridtrain names grouped by layer index (what exporters stream one at a time)."""
    grouped: dict[int, list[str]] = {}
    for name in source.names():
        grouped.setdefault(split_name(name, source.model.num_layers)[0], []).append(name)
    return grouped
