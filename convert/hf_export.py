"""`gridtrain convert CKPT --to hf`: a folder transformers' AutoModelForCausalLM and AutoTokenizer
load with no extra arguments. The weights stream one gridtrain layer at a time from the source
(gridtrain.train.checkpoint.weights or an HF folder) into safetensors shards, so memory holds about
one layer; everything is written into a temporary folder next to --out and renamed into place at
the end, so a failed export never leaves a folder that looks complete."""
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, GPT2Config, LlamaConfig

from gridtrain.convert.hf_names import to_hf
from gridtrain.convert.hf_tokenizer import write_tokenizer_files
from gridtrain.convert.output import publish_folder, temporary_folder
from gridtrain.convert.safetensors_stream import Planned, ShardWriter, plan_shards
from gridtrain.convert.sources import layer_names
from gridtrain.errors import UserError
from gridtrain.model.config import ModelConfig
from gridtrain.model.naming import split_name
from gridtrain.train.checkpoint.manifest import fsync_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_config(model: ModelConfig, dtype: str, ids: dict):
    """transformers' own config class for the model (so every field its version expects is set)."""
    tokens = {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad")}
    if model.family == "llama":
        config = LlamaConfig(
            vocab_size=model.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_size,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.kv_heads, head_dim=model.head_dim, hidden_act="silu",
            max_position_embeddings=model.max_seq_len, rms_norm_eps=model.norm_eps, rope_theta=model.rope_theta,
            tie_word_embeddings=model.tied, attention_bias=False, mlp_bias=False, dtype=HF_DTYPE_NAMES[dtype], **tokens)
        config.architectures = ["LlamaForCausalLM"]
    else:
        config = GPT2Config(
            vocab_size=model.vocab_size, n_embd=model.hidden_size, n_layer=model.num_layers,
            n_head=model.num_attention_heads, n_inner=model.ffn_size, n_positions=model.max_seq_len,
            layer_norm_epsilon=model.norm_eps, activation_function="gelu_new", tie_word_embeddings=True,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dtype=HF_DTYPE_NAMES[dtype], **tokens)
        config.architectures = ["GPT2LMHeadModel"]
    return config


def hf_layer(source, layer: int, names: list[str], get) -> list[tuple[str, torch.Tensor]]:
    """HF tensors of one gridtrain layer; `get(name)` gives each gridtrain tensor (real or meta)."""
    model = source.model
    return to_hf(model, layer, {split_name(name, model.num_layers)[1]: get(name) for name in names})


def plan(source, dtype: torch.dtype) -> list[Planned]:
    """Every HF tensor's name and shape, in write order, from the source's shapes alone."""
    planned = []
    for layer, names in sorted(layer_names(source).items()):
        meta = hf_layer(source, layer, names, lambda name: torch.empty(source.shape(name), device="meta"))
        planned += [Planned(hf_name, tuple(tensor.shape), dtype) for hf_name, tensor in meta]
    return planned


def write_weights(source, folder: Path, dtype: str, max_shard_bytes: int) -> list[str]:
    """Stream the source's weights into safetensors shards (plus the index when there are
    several); returns the file names. A progress bar per file on stderr."""
    shards = plan_shards(plan(source, DTYPES[dtype]), max_shard_bytes)
    pending = iter(shards)
    writer, bar = None, None
    for layer, names in sorted(layer_names(source).items()):
        for hf_name, tensor in hf_layer(source, layer, names, source.tensor):
            if writer is None:
                shard = next(pending)
                writer = ShardWriter(folder / shard.filename, shard)
                bar = tqdm(total=shard.nbytes, unit="B", unit_scale=True, desc=shard.filename, file=sys.stderr)
            bar.update(writer.write(hf_name, tensor.to(DTYPES[dtype]).contiguous()))
            if writer.done:
                writer.close()
                bar.close()
                writer = None
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
                 "weight_map": {t.name: s.filename for s in shards for t in s.tensors}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [s.filename for s in shards]


def export_hf(source, out: Path, dtype: str, max_shard_bytes: int, force: bool, tokenizer: str | None) -> Path:
    """Write the HF folder `out` for `source`; refuses a non-empty `out` unless `force`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype}: use one of {', '.join(DTYPES)}")
    if tokenizer is None:
        raise UserError(f"{source.path}: no tokenizer.model to export with the weights; the checkpoint's run "
                        "had no data.tokenizer")
    with temporary_folder(out, force) as folder:
        ids = write_tokenizer_files(tokenizer, folder, source.model.max_seq_len)
        hf_config(source.model, dtype, ids).save_pretrained(folder)
        # eos stops generation; greedy by default, as `gridtrain generate` at temperature 0.
        GenerationConfig(bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"), pad_token_id=ids.get("pad"),
                         do_sample=False).save_pretrained(folder)
        write_weights(source, folder, dtype, max_shard_bytes)
        for path in folder.iterdir():
            fsync_file(path)
        return publish_folder(folder, out, force)


def parse_size(text: str) -> int:
    """"5GB", "500MB", "2GiB", "1024" (bytes) -> bytes, as transformers' max_shard_size reads them."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[:-len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise UserError(f"--max-shard-size={text!r}: give a size like 5GB, 500MB or 2GiB")
