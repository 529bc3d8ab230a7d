"""`gridtrain convert CKPT --to gguf`: one GGUF file for llama.cpp (and Ollama, transformers' GGUF
loader) through gguf-py, llama.cpp's own writer, for the llama family.

llama.cpp's llama architecture wants the metadata its loader requires (context and embedding
length, block count, feed-forward length, head counts, RMS eps, rope base and dimension count),
the SentencePiece vocabulary (pieces, scores, token types, special ids), and Q and K rows permuted
from the "rotate half" layout (Hugging Face's and gridtrain's) into its interleaved-pair layout,
K grouped by KV heads, as llama.cpp's convert_hf_to_gguf.py does. Tensors stream one layer at a
time: the writer takes every tensor's shape first, then the data in the same order."""
import sys
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
import torch
from tqdm import tqdm

from gridtrain.convert.output import publish_file, temporary_file
from gridtrain.convert.sources import layer_names
from gridtrain.data.spm_model import special_ids
from gridtrain.errors import UserError
from gridtrain.model.naming import EMBEDDING, final_norm_index, head_index, split_name

GGUF_DTYPES = ("f32", "f16", "bf16")
_BLOCK = {"attn_norm.weight": "attn_norm", "attn.q_proj.weight": "attn_q", "attn.k_proj.weight": "attn_k",
          "attn.v_proj.weight": "attn_v", "attn.o_proj.weight": "attn_output", "mlp_norm.weight": "ffn_norm",
          "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate-half rows (per head: first half, second half) -> interleaved pairs, per head."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(model, name: str) -> str:
    layer, key = split_name(name, model.num_layers)
    if layer == EMBEDDING:
        return "token_embd.weight"
    if layer == final_norm_index(model.num_layers):
        return "output_norm.weight"
    if layer == head_index(model.num_layers):
        return "output.weight"
    return f"blk.{layer - 1}.{_BLOCK[key]}.weight"


def gguf_tensor(model, name: str, tensor: torch.Tensor) -> torch.Tensor:
    key = split_name(name, model.num_layers)[1]
    if key == "attn.q_proj.weight":
        return permute_rows(tensor, model.num_attention_heads)
    if key == "attn.k_proj.weight":
        return permute_rows(tensor, model.kv_heads)
    return tensor


def _stored(dtype: str, ndim: int) -> tuple[torch.dtype, np.dtype]:
    """(torch dtype, numpy dtype handed to gguf) of a tensor: norms stay f32 (llama.cpp's converter
    keeps 1-D tensors in f32), matrices in `dtype`; gguf takes BF16 as raw 16-bit words."""
    if dtype == "f32" or ndim == 1:
        return torch.float32, np.dtype(np.float32)
    if dtype == "f16":
        return torch.float16, np.dtype(np.float16)
    return torch.bfloat16, np.dtype(np.uint16)


def _numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    torch_dtype, np_dtype = _stored(dtype, tensor.dim())
    converted = tensor.to(torch_dtype).contiguous()
    return (converted.view(torch.uint16) if np_dtype == np.uint16 else converted).numpy()


def _vocab(writer, tokenizer: str, vocab_size: int) -> None:
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    pieces, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        pieces.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        types.append(gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                     else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                     else gguf.TokenType.NORMAL)
    for i in range(sp.GetPieceSize(), vocab_size):  # model rows beyond the tokenizer: never produced
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    ids = special_ids(sp)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[name] >= 0:
            add(ids[name])
    writer.add_add_bos_token(False)  # gridtrain's data has no BOS
    writer.add_add_eos_token(False)


def _metadata(writer, model, dtype: str) -> None:
    writer.add_name("gridtrain-llama")
    writer.add_context_length(model.max_seq_len)
    writer.add_embedding_length(model.hidden_size)
    writer.add_block_count(model.num_layers)
    writer.add_feed_forward_length(model.ffn_size)
    writer.add_head_count(model.num_attention_heads)
    writer.add_head_count_kv(model.kv_heads)
    writer.add_layer_norm_rms_eps(model.norm_eps)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_vocab_size(model.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])


def export_gguf(source, out: Path, dtype: str, force: bool) -> Path:
    """Write the GGUF file `out` for a llama `source`."""
    model = source.model
    if model.family != "llama":
        raise UserError(f"--to gguf: model.family={model.family!r} is not exported to GGUF (llama only); "
                        "use --to hf for gpt2")
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype={dtype}: GGUF export writes one of {', '.join(GGUF_DTYPES)}")
    if source.tokenizer is None:
        raise UserError(f"{source.path}: no tokenizer.model to put in the GGUF file; the run had no data.tokenizer")
    order = [name for _, names in sorted(layer_names(source).items()) for name in names]
    with temporary_file(out, force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _metadata(writer, model, dtype)
        _vocab(writer, source.tokenizer, model.vocab_size)
        for name in order:
            shape = source.shape(name)
            np_dtype = _stored(dtype, len(shape))[1]
            raw = gguf.GGMLQuantizationType.BF16 if np_dtype == np.uint16 else None
            nbytes = int(np.prod(shape)) * np_dtype.itemsize
            writer.add_tensor_info(gguf_name(model, name), shape, np_dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in tqdm(order, desc=Path(out).name, unit="tensor", file=sys.stderr):
            writer.write_tensor_data(_numpy(gguf_tensor(model, name, source.tensor(name)), dtype))
        writer.close()
        return publish_file(tmp, out)
