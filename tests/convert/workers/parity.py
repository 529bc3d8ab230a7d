"""Worker for test_hf_export.py, one process: for each exported checkpoint, transformers' logits on
random token batches against gridtrain's own forward of the checkpoint (a one-rank Decoder holding
its weights), with a negative control (Q rows permuted in the transformers model); greedy
generation of 32 tokens by gridtrain and by transformers' generate; AutoTokenizer against
SentencePiece; and, given a GGUF file, transformers' GGUF loader against the HF export plus the
metadata gguf's own reader sees. Writes one JSON file.

Usage: parity.py OUT.json NAME=CKPT,HF_DIR[,GGUF] ...
"""
import json
import sys
from pathlib import Path

import torch

STRINGS = ["hello world", "  two leading spaces", "runs   of    spaces", "tab\there\nnew line\n\n",
           "unicode: héllo wörld — 日本語 🙂", "byte fallback: \u2603\ufffd\U0001F9EC", "def f(x):\n    return x</s>",
           "text with <eod> and </s> and <s> inside", "", " "]
PROMPT = "def main(argv):\n    "


def logits_gap(model, decoder, vocab: int) -> tuple[float, float]:
    """(max |transformers - gridtrain| over 3 random batches of ids < vocab, max |logit|)."""
    gap = scale = 0.0
    for seed in range(3):
        tokens = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(seed))
        positions = torch.arange(48).expand(2, 48)
        with torch.no_grad():
            ours = decoder(tokens, positions, torch.zeros_like(tokens))[..., :decoder.cfg.vocab_size]
            theirs = model(tokens).logits
        gap, scale = max(gap, (ours - theirs).abs().max().item()), max(scale, theirs.abs().max().item())
    return gap, scale


def permute_q_rows(model, family: str) -> None:
    """The classic converter bug: Q rows in the wrong order (two rows of head 0 swapped)."""
    with torch.no_grad():
        if family == "llama":
            weight = model.model.layers[0].self_attn.q_proj.weight  # (heads * d, h)
            weight[[0, 1]] = weight[[1, 0]]
        else:
            weight = model.transformer.h[0].attn.c_attn.weight  # Conv1D (h, 3h): Q is columns [0, h)
            weight[:, [0, 1]] = weight[:, [1, 0]]


def check_one(ckpt: str, hf_dir: str, gguf_path: str | None) -> dict:
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gridtrain.convert.generate import load_decoder
    from gridtrain.convert.sources import open_weights
    from gridtrain.data.tokenizer import load_tokenizer
    from gridtrain.model.generation import Sampling, generate
    from gridtrain.parallel import groups

    source = open_weights(ckpt)
    decoder = load_decoder(source, "cpu")
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    sp = spm.SentencePieceProcessor(model_file=str(Path(hf_dir) / "tokenizer.model"))
    vocab = sp.GetPieceSize()
    gap, scale = logits_gap(model, decoder, vocab)
    prompt = sp.encode(PROMPT)
    # Both choose among the tokenizer's ids only (the model's vocab has 68 more rows: no tokens).
    ours = generate(decoder, [prompt], Sampling(max_new_tokens=32), load_tokenizer(source.tokenizer).stop_ids,
                    vocab_size=vocab)[0]
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                            suppress_tokens=list(range(vocab, source.model.vocab_size)))[0, len(prompt):].tolist()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    result = {"family": source.model.family, "gap": gap, "scale": scale, "ours": ours, "theirs": theirs,
              "hf_class": type(model).__name__,
              "tokenizer_mismatches": [s for s in STRINGS if tokenizer.encode(s) != sp.encode(s)],
              "decode_mismatches": [s for s in STRINGS if tokenizer.decode(sp.encode(s)) != sp.decode(sp.encode(s))]}
    if gguf_path:
        result.update(check_gguf(model, gguf_path, vocab))
    permute_q_rows(model, source.model.family)
    result["permuted_gap"] = logits_gap(model, decoder, vocab)[0]
    groups.destroy(world=False)
    return result


def check_gguf(hf_model, gguf_path: str, vocab: int) -> dict:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    path = Path(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    gap = 0.0
    for seed in range(3):
        tokens = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            gap = max(gap, (loaded(tokens).logits - hf_model(tokens).logits).abs().max().item())
    reader = GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith(("llama.", "tokenizer.ggml.bos", "tokenizer.ggml.eos", "general.architecture")):
            value = field.contents()
            fields[name] = value if isinstance(value, (int, float, str)) else str(value)
    fields["token_count"] = len(reader.fields["tokenizer.ggml.tokens"].contents())
    fields["tensor_names"] = sorted(t.name for t in reader.tensors)
    return {"gguf_gap": gap, "gguf_fields": fields}


def main() -> None:
    out, results = Path(sys.argv[1]), {}
    for spec in sys.argv[2:]:
        name, paths = spec.split("=", 1)
        ckpt, hf_dir, *rest = paths.split(",")
        results[name] = check_one(ckpt, hf_dir, rest[0] if rest else None)
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
