"""The model a weight source describes, read from its config files alone (no tensors, no torch, no
checksums): what `gridtrain train` checks train.init_from against before any rank starts."""
from pathlib import Path

from gridtrain.convert.hf_config import model_config_from_hf
from gridtrain.errors import UserError
from gridtrain.train.checkpoint.manifest import MANIFEST_NAME, saved_model
from gridtrain.train.checkpoint.store import list_checkpoints


def hf_weights_problem(folder: Path) -> str | None:
    """Why an HF folder has no weights gridtrain can read, or None: safetensors files, else pickle
    .bin files (read only with --trust-pickle)."""
    if any(Path(folder).glob("*.safetensors")) or any(Path(folder).glob("*.bin")):
        return None
    return (f"{folder}: no *.safetensors (or *.bin) weights next to config.json; download the model's weight "
            "files too, or give the folder that holds them")


def source_model_config(path: str | Path):
    """Only the ModelConfig of the source at `path`, cheaply (no tensors, no checksums)."""
    path = Path(path)
    if (path / "config.json").exists():
        model = model_config_from_hf(path)
        problem = hf_weights_problem(path)
        if problem:
            raise UserError(problem)
        return model
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; give a Hugging Face model folder or a gridtrain checkpoint")
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
    if model.family == "llama":
        fields += ["head_size", "qkv_bias", "attn_out_bias", "mlp_bias", "qk_norm", "rope_theta", "rope_scaling"]
        if theirs.rope_scaling != "none":
            fields += ["rope_factor"] + (["rope_low_freq_factor", "rope_high_freq_factor",
                                          "rope_original_max_positions"] if theirs.rope_scaling == "llama3" else [])
    else:
        fields += ["max_seq_len"]
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
