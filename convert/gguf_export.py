"""`gridtrain convert CKPT --to gguf`: one GGUF file for llama.cpp (and Ollama, LM Studio,
transformers' GGUF loader) through gguf-py, llama.cpp's own writer, for the llama family as
llama.cpp's `llama` (Llama, Mistral, SmolLM2), `qwen2` and `qwen3` architectures describe it.

What llama.cpp's loader needs (read in its src/models/<arch>.cpp and convert_hf_to_gguf.py):
- metadata: context and embedding length, block count, feed-forward length, head counts, RMS eps,
  rope base; the rope dimension count (llama), key/value length when head_dim is not hidden /
  heads (qwen3); linear rope scaling as rope.scaling.type/factor;
- the vocabulary (gridtrain.convert.gguf_vocab);
- tensors named token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}, output_norm, output (none when tied); q/k/v biases (all three
  archs), attn_output and ffn biases (llama only), attn_q_norm/attn_k_norm (qwen3); every tensor
  in the file must be one the architecture loads;
- for `llama` only, Q and K rows permuted from the "rotate half" layout (Hugging Face's and
  gridtrain's) into llama.cpp's interleaved pairs, K grouped by KV heads; Llama 3.1's rope scaling
  as a rope_freqs tensor of per-frequency divisors (qwen2/qwen3 rotate "half" themselves and load
  no rope_freqs).

A model that none of these describes is refused in one line. Types: f32, f16, bf16 for every
matrix; q8_0 (every matrix, token_embd and output too, as llama.cpp's converter does) and q4_0
(matrices in Q4_0, token_embd and output in Q8_0: they carry the whole vocabulary) through gguf-py's
quants; 1-D tensors (norms, biases, rope_freqs) stay f32, and a matrix whose rows are not whole
32-value blocks is written f16. Tensors stream one layer at a time: the writer takes every
tensor's shape first, then the data in the same order."""
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import quant_shape_to_byte_shape, quantize
from tqdm import tqdm

from gridtrain.convert.gguf_vocab import write_vocab
from gridtrain.convert.output import check_export, publish_file, temporary_file
from gridtrain.convert.sources import layer_names
from gridtrain.data.tokenizer import load_tokenizer
from gridtrain.errors import UserError
from gridtrain.model.config import ModelConfig
from gridtrain.model.naming import EMBEDDING, final_norm_index, head_index, split_name

T = gguf.GGMLQuantizationType
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_BLOCK = {"attn_norm.weight": "attn_norm.weight", "attn.q_proj.weight": "attn_q.weight",
          "attn.k_proj.weight": "attn_k.weight", "attn.v_proj.weight": "attn_v.weight",
          "attn.o_proj.weight": "attn_output.weight", "mlp_norm.weight": "ffn_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight", "attn.q_proj.bias": "attn_q.bias",
          "attn.k_proj.bias": "attn_k.bias", "attn.v_proj.bias": "attn_v.bias", "attn.o_proj.bias": "attn_output.bias",
          "attn.q_norm.weight": "attn_q_norm.weight", "attn.k_norm.weight": "attn_k_norm.weight",
          "mlp.gate_proj.bias": "ffn_gate.bias", "mlp.up_proj.bias": "ffn_up.bias", "mlp.down_proj.bias": "ffn_down.bias"}
ROPE_FREQS = "rope_freqs.weight"


def architecture(model: ModelConfig) -> str:
    """llama.cpp's architecture for the model, or one line saying why none fits."""
    if model.family != "llama":
        raise UserError(f"--to gguf: model.family={model.family!r} is not exported to GGUF (the llama family is); "
                        "use --to hf for gpt2")
    arch = ARCHITECTURES[model.export_model_type]
    refusals = []
    if arch == "llama" and model.qk_norm:
        refusals.append("qk_norm (llama.cpp's llama has no q/k norms)")
    if arch != "llama" and (model.attn_out_bias or model.mlp_bias):
        refusals.append(f"attn_out_bias / mlp_bias (llama.cpp's {arch} loads no such biases)")
    if arch == "qwen2" and model.attention_width != model.hidden_size:
        refusals.append(f"head_dim {model.head_size} (llama.cpp's qwen2 needs heads x head_dim = hidden_size)")
    if arch != "llama" and model.rope_scaling == "llama3":
        refusals.append(f"rope_scaling llama3 (llama.cpp's {arch} reads no rope_freqs)")
    if refusals:
        raise UserError(f"--to gguf: this {model.export_model_type} model has {' and '.join(refusals)}; export "
                        "with --to hf instead")
    return arch


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate-half rows (per head: first half, second half) -> interleaved pairs, per head."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(model: ModelConfig, name: str) -> str:
    layer, key = split_name(name, model.num_layers)
    if layer == EMBEDDING:
        return "token_embd.weight"
    if layer == final_norm_index(model.num_layers):
        return "output_norm.weight"
    if layer == head_index(model.num_layers):
        return "output.weight"
    return f"blk.{layer - 1}.{_BLOCK[key]}"


def gguf_tensor(model: ModelConfig, arch: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as llama.cpp's `arch` wants it: Q/K rows (and biases) permuted for llama."""
    key = split_name(name, model.num_layers)[1]
    if arch == "llama" and key.startswith(("attn.q_proj.", "attn.k_proj.")):
        heads = model.num_attention_heads if key.startswith("attn.q_proj.") else model.kv_heads
        return permute_rows(tensor, heads)
    return tensor


def rope_freqs(model: ModelConfig) -> torch.Tensor:
    """Llama 3.1's scaling as the per-frequency divisors llama.cpp applies (llama.cpp's converter:
    LlamaModel.generate_extra_tensors): 1 for short wavelengths, factor for long ones, blended."""
    d, factor = model.head_size, model.rope_factor
    low, high, original = model.rope_low_freq_factor, model.rope_high_freq_factor, model.rope_original_max_positions
    freqs = 1.0 / (model.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    divisors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32)


def stored_type(dtype: str, gguf_tensor_name: str, shape: tuple) -> T:
    """The GGML type a tensor is written in (see the module docstring)."""
    if dtype == "f32" or len(shape) == 1:
        return T.F32
    if dtype in ("f16", "bf16"):
        return T.F16 if dtype == "f16" else T.BF16
    if shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
        return T.F16
    if dtype == "q4_0" and gguf_tensor_name not in ("token_embd.weight", "output.weight"):
        return T.Q4_0
    return T.Q8_0


def _encode(tensor: torch.Tensor, qtype: T) -> np.ndarray:
    data = tensor.float().contiguous()
    if qtype == T.F32:
        return data.numpy()
    if qtype == T.F16:
        return data.to(torch.float16).numpy()
    if qtype == T.BF16:  # gguf takes BF16 as raw 16-bit words
        return data.to(torch.bfloat16).view(torch.uint16).numpy()
    return quantize(data.numpy(), qtype)


def _nbytes(shape: tuple, qtype: T) -> int:
    if qtype in (T.Q8_0, T.Q4_0):
        return int(np.prod(quant_shape_to_byte_shape(shape, qtype)))
    return int(np.prod(shape)) * (4 if qtype == T.F32 else 2)


FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


def _metadata(writer: gguf.GGUFWriter, model: ModelConfig, arch: str, dtype: str) -> None:
    writer.add_name(f"gridtrain-{model.export_model_type}")
    writer.add_context_length(model.max_seq_len)
    writer.add_embedding_length(model.hidden_size)
    writer.add_block_count(model.num_layers)
    writer.add_feed_forward_length(model.ffn_size)
    writer.add_head_count(model.num_attention_heads)
    writer.add_head_count_kv(model.kv_heads)
    writer.add_layer_norm_rms_eps(model.norm_eps)
    writer.add_rope_freq_base(model.rope_theta)
    if model.head_dim is not None:
        writer.add_key_length(model.head_size)
        writer.add_value_length(model.head_size)
    if arch == "llama":
        writer.add_rope_dimension_count(model.head_size)
        writer.add_vocab_size(model.vocab_size)
    if model.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(model.rope_factor)
    writer.add_file_type(FILE_TYPES[dtype])


def export_gguf(source, out: Path, dtype: str, force: bool) -> Path:
    """Write the GGUF file `out` for a llama-family `source`."""
    model = source.model
    arch = architecture(model)
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype={dtype}: GGUF export writes one of {', '.join(GGUF_DTYPES)}")
    if source.tokenizer is None:
        raise UserError(f"{source.path}: no tokenizer to put in the GGUF file (a checkpoint records data.tokenizer, "
                        "an HF folder holds tokenizer.json or tokenizer.model)")
    tokenizer = load_tokenizer(source.tokenizer)
    order = [name for _, names in sorted(layer_names(source).items()) for name in names]
    check_export(out, "gguf", force, sources=(source.path,))
    extra = [(ROPE_FREQS, rope_freqs(model))] if model.rope_scaling == "llama3" else []
    with temporary_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _metadata(writer, model, arch, dtype)
        write_vocab(writer, tokenizer, model.vocab_size)
        planned = [(gguf_name(model, name), tuple(source.shape(name))) for name in order]
        planned += [(name, tuple(tensor.shape)) for name, tensor in extra]
        for name, shape in planned:
            qtype = stored_type(dtype, name, shape)
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        getters = [lambda n=n: gguf_tensor(model, arch, n, source.tensor(n)) for n in order]
        getters += [lambda t=t: t for _, t in extra]
        for (name, shape), get in tqdm(list(zip(planned, getters)), desc=Path(out).name, unit="tensor",
                                       file=sys.stderr):
            writer.write_tensor_data(_encode(get(), stored_type(dtype, name, shape)))
        writer.close()
        return publish_file(tmp, out)
