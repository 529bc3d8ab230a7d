"""Worker for test_hf_export.py's export matrix, one process: for each checkpoint (one of every kind
the engine writes), gridtrain's own forward of its weights (a one-rank fp32 Decoder) against each
export read back by its own reader: the HF folder by transformers, GGUF files (f32, f16, bf16,
q8_0, q4_0, written by gridtrain's exporter) by llama.cpp. Logits are compared where the exports
predict the next token: all positions of random id sequences. Each GGUF file's perplexity in
llama.cpp on held-out text (a standard-library source the corpus does not hold) is reported for the
quantization check. For the f32 file also llama.cpp's tokenization of the hard text set against
gridtrain's tokenizer, and its greedy continuation of three prompts against gridtrain's `generate`
on the same prompt ids. Writes one JSON file.

Usage: export_matrix.py OUT.json WORK_DIR NAME=CKPT[,HF_DIR] ...  (no HF_DIR: exported here)"""
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for llamacpp
import llamacpp  # noqa: E402
from hf_tokenizers import HARD_TEXTS  # noqa: E402

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
LENGTH = 48
PROMPTS = ["def main(argv):\n    ", "import os\n", "class Error(Exception):"]
GREEDY = 24
HELD_OUT = Path(sysconfig.get_paths()["stdlib"]) / "zipimport.py"  # past the corpus's first 60 sources


def sequences(vocab: int) -> list[list[int]]:
    return [torch.randint(0, vocab, (LENGTH,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(2)]


def gridtrain_logits(decoder, tokens: list[int]) -> np.ndarray:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = decoder(ids, torch.arange(len(tokens))[None], torch.zeros_like(ids))[0, :, :decoder.cfg.vocab_size]
    return out.numpy()


def perplexity(llm, tokens: list[int]) -> float:
    """exp(mean next-token negative log-likelihood) of `tokens` under llama.cpp's logits."""
    logits = llamacpp.logits(llm, tokens)[:-1].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(np.exp(-log_probs[np.arange(len(tokens) - 1), tokens[1:]].mean()))


def check_one(ckpt: str, hf_dir: str | None, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from gridtrain.convert.hf_export import export_hf

    from gridtrain.convert.generate import Generator, load_decoder
    from gridtrain.convert.gguf_export import export_gguf
    from gridtrain.convert.sources import open_weights
    from gridtrain.data.tokenizer import load_tokenizer
    from gridtrain.model.generation import Sampling, generate
    from gridtrain.parallel import groups

    source = open_weights(ckpt)
    decoder = load_decoder(source, "cpu")
    generator = Generator(decoder, load_tokenizer(source.tokenizer))
    seqs = sequences(min(source.model.vocab_size, 700))
    ours = [gridtrain_logits(decoder, s) for s in seqs]
    prompts = [generator.prompt_ids(p) for p in PROMPTS]
    continued = [generate(decoder, [p], Sampling(max_new_tokens=GREEDY), stop_ids=())[0] for p in prompts]
    groups.destroy(world=False)
    scale = max(float(np.abs(o).max()) for o in ours)
    if hf_dir is None:
        hf_dir = export_hf(source, work / "hf", "fp32", 5 * 10**9, force=False, tokenizer=source.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = [model(torch.tensor([s])).logits[0].numpy() for s in seqs]
    gaps = {"hf": max(float(np.abs(h - o).max()) for h, o in zip(hf, ours))}
    sizes, ppl = {}, {}
    held_out = generator.tokenizer.encode(HELD_OUT.read_text(encoding="utf-8"))[:255]
    result = {"family": source.model.family, "scale": scale, "gaps": gaps, "sizes": sizes, "perplexity": ppl}
    for dtype in GGUF_DTYPES if source.model.family == "llama" else ():
        path = export_gguf(source, work / f"{dtype}.gguf", dtype, force=False)
        sizes[dtype] = path.stat().st_size
        llm = llamacpp.load(path)
        gaps[f"gguf-{dtype}"] = max(float(np.abs(llamacpp.logits(llm, s) - o).max()) for s, o in zip(seqs, ours))
        ppl[dtype] = perplexity(llm, held_out)
        if dtype == "f32":
            result["tokenizer_mismatches"] = [t for t in HARD_TEXTS
                                              if llamacpp.tokenize(llm, t) != generator.tokenizer.encode(t)]
            result["greedy"] = [[ours_, llamacpp.greedy(llm, p, GREEDY)] for p, ours_ in zip(prompts, continued)]
        llm.close()
    return result


def main() -> None:
    out, work, results = Path(sys.argv[1]), Path(sys.argv[2]), {}
    for spec in sys.argv[3:]:
        name, paths = spec.split("=", 1)
        ckpt, _, hf_dir = paths.partition(",")
        results[name] = check_one(ckpt, hf_dir or None, work / name)
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
