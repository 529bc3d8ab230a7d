"""Reading: samples/s and tokens/s the training data path (megatron-core GPTDataset over the shards,
our Megatron-order DP sampler and collation) delivers on one core, against what the demo model
consumes: the mean training tokens/s of the last `make demo` run (demo/run/metrics.jsonl, all its
ranks together). Shards: the demo's if present, else built here from the same corpus.
Last line: reader tokens/s over demo tokens/s (target >= 50)."""
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

SEQ_LENGTH = 256  # the tiny-llama preset's
MICRO_BATCH = 4
DEMO_DIR = Path(os.environ.get("BENCH_DEMO_DIR", "demo"))  # where `make demo` worked
SAMPLES = 4000


def shards(work: Path) -> tuple[str, str]:
    demo = DEMO_DIR
    prefix, model = demo / "data" / "corpus_text_document", demo / "tokenizer" / "tokenizer.model"
    if Path(f"{prefix}.idx").exists() and model.exists():
        return str(prefix), str(model)
    from gridtrain.data.preprocess import PreprocessOptions, preprocess
    from gridtrain.data.tokenizer_train import train_tokenizer
    from gridtrain.launcher.demo import build_corpus

    corpus = work / "stdlib.jsonl"
    build_corpus(corpus)
    model = train_tokenizer([str(corpus)], 8000, str(work / "tok"), "bpe", 10_000_000)["model"]
    preprocess(PreprocessOptions(inputs=(str(corpus),), tokenizer=model, output_prefix=str(work / "corpus"), workers=2),
               open(os.devnull, "w"))
    return str(work / "corpus"), model


def demo_tokens_per_s(metrics: Path):
    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in records if r.get("kind") == "train"][1:]  # skip warm-up step
    return sum(rates) / len(rates) if rates else None


def main() -> None:
    import torch

    from gridtrain.data.config import DataConfig
    from gridtrain.data.datasets import build_datasets
    from gridtrain.data.loader import batches
    from gridtrain.data.tokenizer import SentencePieceTokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        prefix, model = shards(Path(tmp))
        cfg = DataConfig(blend=((1.0, prefix),), seq_length=SEQ_LENGTH, split="98,1,1")
        train = build_datasets(cfg, (SAMPLES, 0, 0), str(Path(tmp) / "cache"), SentencePieceTokenizer(model))[0]
        stream = batches(train, 0, MICRO_BATCH, 0, 1, cfg)
        next(stream)  # first touch of the memory maps
        start = time.perf_counter()
        count = 0
        for batch in stream:
            count += batch["tokens"].shape[0]
            if count >= SAMPLES - 2 * MICRO_BATCH:
                break
        seconds = time.perf_counter() - start
    samples_per_s = count / seconds
    tokens_per_s = samples_per_s * SEQ_LENGTH
    demo = demo_tokens_per_s(DEMO_DIR / "run" / "metrics.jsonl")
    print(f"{'measurement':52s} {'samples/s':>10s} {'tokens/s':>12s}")
    print(f"{'reader: GPTDataset + sampler + collate, 1 core':52s} {samples_per_s:10,.0f} {tokens_per_s:12,.0f}")
    if demo is None:
        print("headline: no demo/run/metrics.jsonl: run `make demo` first for the demo's consumption")
        return
    print(f"{'demo training (make demo, all ranks)':52s} {demo / SEQ_LENGTH:10,.1f} {demo:12,.0f}")
    print(f"headline: reader / demo training tokens/s = {tokens_per_s / demo:,.0f}x (target >= 50x)")


if __name__ == "__main__":
    sys.exit(main())
