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
from transformers import GenerationConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from gridtrain.convert.hf_names import to_hf
from gridtrain.convert.hf_tokenizer import write_tokenizer_files
from gridtrain.convert.output import check_export, publish_folder, temporary_folder
from gridtrain.convert.safetensors_stream import Planned, ShardWriter, plan_shards
from gridtrain.convert.sources import layer_names
from gridtrain.data.tokenizer import load_tokenizer
from gridtrain.errors import UserError
from gridtrain.model.config import ModelConfig
from gridtrain.model.naming import split_name
from gridtrain.train.checkpoint.manifest import fsync_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rope_parameters(model: ModelConfig) -> dict:
    """transformers 5's rope_parameters of the model's rotary embedding."""
    params = {"rope_type": "default" if model.rope_scaling == "none" else model.rope_scaling,
              "rope_theta": model.rope_theta}
    if model.rope_scaling == "linear":
        params["factor"] = model.rope_factor
    elif model.rope_scaling == "llama3":
        params.update(factor=model.rope_factor, low_freq_factor=model.rope_low_freq_factor,
                      high_freq_factor=model.rope_high_freq_factor,
                      original_max_position_embeddings=model.rope_original_max_positions)
    return params


def _options_problem(model: ModelConfig, kind: str) -> str | None:
    """Why the model's options cannot be written as transformers' `kind`, or None: each model class
    hard-codes which projections have biases and whether q/k are normed."""
    attention_bias = model.qkv_bias and model.attn_out_bias
    fits = {"llama": not model.qk_norm and model.qkv_bias == model.attn_out_bias,
            "mistral": not (model.qk_norm or model.qkv_bias or model.attn_out_bias or model.mlp_bias),
            "qwen2": not model.qk_norm and model.qkv_bias and not model.attn_out_bias and not model.mlp_bias,
            "qwen3": model.qk_norm and model.qkv_bias == model.attn_out_bias and not model.mlp_bias}
    if fits[kind]:
        return None
    return (f"model.hf_model_type={kind!r}: transformers' {kind} has no model with qk_norm={model.qk_norm}, "
            f"qkv_bias={model.qkv_bias}, attn_out_bias={model.attn_out_bias}, mlp_bias={model.mlp_bias} "
            f"(attention_bias {attention_bias}); set hf_model_type to null to let gridtrain pick the one that fits")


def hf_config(model: ModelConfig, dtype: str, ids: dict):
    """transformers' own config class for the model (so every field its version expects is set)."""
    tokens = {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad")}
    if model.family == "gpt2":
        config = GPT2Config(
            vocab_size=model.vocab_size, n_embd=model.hidden_size, n_layer=model.num_layers,
            n_head=model.num_attention_heads, n_inner=model.ffn_size, n_positions=model.max_seq_len,
            layer_norm_epsilon=model.norm_eps, activation_function="gelu_new", tie_word_embeddings=True,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dtype=HF_DTYPE_NAMES[dtype], **tokens)
        config.architectures = ["GPT2LMHeadModel"]
        return config
    kind = model.export_model_type
    problem = _options_problem(model, kind)
    if problem:
        raise UserError(f"--to hf: {problem}")
    common = dict(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.kv_heads, head_dim=model.head_size, hidden_act="silu",
        max_position_embeddings=model.max_seq_len, rms_norm_eps=model.norm_eps,
        rope_parameters=_rope_parameters(model), tie_word_embeddings=model.tied, dtype=HF_DTYPE_NAMES[dtype], **tokens)
    if kind == "llama":
        config = LlamaConfig(attention_bias=model.qkv_bias, mlp_bias=model.mlp_bias, **common)
    elif kind == "mistral":
        config = MistralConfig(sliding_window=None, **common)
    elif kind == "qwen2":
        config = Qwen2Config(use_sliding_window=False, **common)
    else:
        config = Qwen3Config(attention_bias=model.qkv_bias, use_sliding_window=False, **common)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
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
    """Write the HF folder `out` for `source` with `tokenizer` (a path gridtrain.data.tokenizer
    reads); refuses a non-empty `out` unless `force`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype}: use one of {', '.join(DTYPES)}")
    if tokenizer is None:
        raise UserError(f"{source.path}: no tokenizer to export with the weights (a checkpoint records "
                        "data.tokenizer, an HF folder holds tokenizer.json or tokenizer.model)")
    tokenizer = load_tokenizer(tokenizer)
    check_export(out, "hf", force, sources=(source.path,))
    with temporary_folder(out) as folder:
        ids = write_tokenizer_files(tokenizer, folder, source.model.max_seq_len)
        hf_config(source.model, dtype, ids).save_pretrained(folder)
        # eos (and end-of-turn tokens) stop generation; greedy by default, as `gridtrain generate`.
        stops = sorted(tokenizer.stop_ids)
        GenerationConfig(bos_token_id=ids.get("bos"), eos_token_id=stops[0] if len(stops) == 1 else stops,
                         pad_token_id=ids.get("pad"), do_sample=False).save_pretrained(folder)
        write_weights(source, folder, dtype, max_shard_bytes)
        for path in folder.iterdir():
            fsync_file(path)
        return publish_folder(folder, out)
