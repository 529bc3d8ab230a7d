"""The tests' one run-config builder (a uniquely named module: tests/ folders are not packages): a
tiny llama on a prefix of the session corpus, 3 steps, no checkpoints, no TensorBoard; any section
field can be overridden. Written as JSON for the workers that call the trainer directly
(tests/json_run.py reads it) or as YAML for the CLI."""
import json
from pathlib import Path

import yaml
from shared_corpus import MODEL_VOCAB

TINY_LLAMA = {"family": "llama", "vocab_size": MODEL_VOCAB, "hidden_size": 64, "num_layers": 2,
              "num_attention_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 128, "max_seq_len": 64}
TINY_GPT2 = {"family": "gpt2", "vocab_size": MODEL_VOCAB, "hidden_size": 64, "num_layers": 2,
             "num_attention_heads": 4, "max_seq_len": 64}


def sections(corpus: dict, run_dir: Path, /, **overrides: dict) -> dict:
    """The config sections of a run on `corpus` ({"tokenizer", "prefix"}) in `run_dir`; each keyword
    is a section whose fields replace the defaults (a model with a "family" replaces the model)."""
    config = {
        "model": dict(TINY_LLAMA),
        "parallel": {"zero_stage": 1},
        "data": {"blend": [[1.0, corpus["prefix"]]], "split": "90,10,0", "seq_length": 64,
                 "tokenizer": corpus["tokenizer"]},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "run_dir": str(run_dir),
                  "eval_interval": 0},
        "checkpoint": {"interval_steps": 0},
        "logging": {"tensorboard": False},
    }
    for section, values in overrides.items():
        base = {} if section == "model" and "family" in values else config.get(section, {})
        config[section] = {**base, **values}
    return config


def write_json(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
