"""Run configs and helpers of the conversion tests (a uniquely named module: tests/ folders are not
packages)."""
import json
import os
from pathlib import Path

from run_config import sections, write_json
from shared_corpus import MODEL_VOCAB

TESTS = Path(__file__).resolve().parents[1]
RUN_WORKER = TESTS / "train" / "run_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
MODELS = {
    "llama": {"family": "llama", "vocab_size": MODEL_VOCAB, "hidden_size": 64, "num_layers": 2,
              "num_attention_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 128, "max_seq_len": 96,
              "rope_theta": 500.0, "init_std": 0.1},
    "gpt2": {"family": "gpt2", "vocab_size": MODEL_VOCAB, "hidden_size": 64, "num_layers": 2,
             "num_attention_heads": 4, "max_seq_len": 96, "init_std": 0.1},
}


def run_config(path: Path, corpus: dict, run_dir: Path, model: dict, steps: int, tp=1, pp=1, zero=1,
               init_from=None, lr=3e-3, dtype="fp32") -> Path:
    """A JSON run config (tests/json_run.py reads it) of a short run checkpointing its last step."""
    return write_json(path, sections(
        corpus, run_dir, model=model, parallel={"tensor_parallel": tp, "pipeline_parallel": pp, "zero_stage": zero},
        data={"split": "95,5,0"}, optim={"lr": lr, "min_lr": lr / 10, "warmup_steps": 1},
        train={"steps": steps, "global_batch_size": 8, "init_from": init_from, "dtype": dtype},
        checkpoint={"interval_steps": steps}))


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def first_batch_loss(family: str, folder: Path, corpus: dict) -> float:
    """transformers' mean next-token loss on the run's first global batch (8 samples of 64 tokens,
    all in the loss), the samples read through gridtrain's datasets as the run reads them."""
    import torch
    from transformers import AutoModelForCausalLM

    from gridtrain.data.config import DataConfig
    from gridtrain.data.datasets import build_datasets, run_samples
    from gridtrain.data.tokenizer import SentencePieceTokenizer

    data = DataConfig(blend=((1.0, corpus["prefix"]),), split="95,5,0", seq_length=64, tokenizer=corpus["tokenizer"])
    cache = folder.parent / f"cache-{family}"
    train = build_datasets(data, run_samples(1, 8, 10), str(cache), SentencePieceTokenizer(corpus["tokenizer"]))[0]
    samples = [train[i] for i in range(8)]
    tokens = torch.stack([s["tokens"] for s in samples]).long()
    labels = torch.stack([s["labels"] for s in samples]).long()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
