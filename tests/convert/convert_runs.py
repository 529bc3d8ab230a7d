"""Run configs and helpers of the conversion tests (a uniquely named module: tests/ folders are not
packages)."""
import json
import os
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
RUN_WORKER = TESTS / "train" / "run_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
MODELS = {
    "llama": {"family": "llama", "vocab_size": 640, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
              "num_kv_heads": 2, "ffn_hidden_size": 128, "max_seq_len": 96, "rope_theta": 500.0, "init_std": 0.1},
    "gpt2": {"family": "gpt2", "vocab_size": 640, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
             "max_seq_len": 96, "init_std": 0.1},
}


def run_config(path: Path, corpus: dict, run_dir: Path, model: dict, steps: int, tp=1, pp=1, zero=1,
               init_from=None, lr=3e-3) -> Path:
    """A JSON run config (tests/json_run.py reads it) of a short run checkpointing its last step."""
    sections = {
        "model": model,
        "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "zero_stage": zero},
        "data": {"blend": [[1.0, corpus["prefix"]]], "split": "95,5,0", "seq_length": 64,
                 "tokenizer": corpus["tokenizer"]},
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": 1},
        "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 2, "run_dir": str(run_dir),
                  "eval_interval": 0, "init_from": init_from},
        "checkpoint": {"interval_steps": steps},
        "logging": {"tensorboard": False},
    }
    path.write_text(json.dumps(sections))
    return path


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]
