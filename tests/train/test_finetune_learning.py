"""Fine-tuning end to end through the commands README's "Fine-tuning" section shows: `gridtrain
preprocess --format chat`, `gridtrain train` from a Hugging Face model (train.init_from) on 2 ranks,
`gridtrain generate --chat`, `gridtrain convert --to hf`. The task: answer with the asked word
reversed, whatever the phrasing. Every word and every phrasing is trained, but each held-out prompt
is a (word, phrasing) pair never trained. Before fine-tuning no held-out answer is right; after,
at least 90% are exact, and transformers' `generate` on `apply_chat_template` input of the exported
folder gives the same answers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from finetune_model import tiny_qwen2

GRIDTRAIN = [sys.executable, "-m", "gridtrain.launcher.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
WORDS = ["river", "city", "number", "color", "garden", "window", "planet", "silver", "forest", "bridge", "candle",
         "mirror", "pocket", "rabbit", "signal", "tunnel", "violet", "winter", "yellow", "anchor", "basket", "circle",
         "dragon", "engine"]
PHRASINGS = ["Reverse the word {}.", "What is {} backwards?", "Spell {} in reverse.", "Write {} reversed.",
             "{} reversed is?", "Please reverse {}", "Give me {} spelled backwards", "Reverse: {}"]
SYSTEM = "You answer with one word."


def gridtrain(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([*GRIDTRAIN, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def split_prompts() -> tuple[list, list]:
    """(trained, held out) (prompt, answer) pairs: word i is held out with phrasing i mod 8."""
    trained, held_out = [], []
    for i, word in enumerate(WORDS):
        for j, phrasing in enumerate(PHRASINGS):
            pair = (phrasing.format(word), word[::-1])
            (held_out if j == i % len(PHRASINGS) else trained).append(pair)
    return trained, held_out


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def exact(lines: list[str], held_out: list) -> float:
    return sum(line == answer for line, (_, answer) in zip(lines, held_out)) / len(held_out)


def test_fine_tuning_teaches_a_task_generate_chat_and_the_hf_export_agree(tmp_path, hf_tokenizers):
    folder = tmp_path / "base"
    model = tiny_qwen2(hf_tokenizers["qwen2"], folder, hidden=128)
    trained, held_out = split_prompts()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(chat(p, a)) + "\n" for p, a in trained))
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("".join(p + "\n" for p, _ in held_out))

    gridtrain("preprocess", "--input", tmp_path / "train.jsonl", "--tokenizer", folder, "--output-prefix",
              tmp_path / "data" / "reverse", "--format", "chat", "--workers", "1")
    config = {
        "model": model,
        "data": {"blend": [[1, str(tmp_path / "data" / "reverse")]], "tokenizer": str(folder), "split": "100,0,0",
                 "seq_length": 64},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10, "weight_decay": 0.0},
        "train": {"steps": 150, "global_batch_size": 16, "micro_batch_size": 8, "init_from": str(folder),
                  "run_dir": str(tmp_path / "run"), "eval_interval": 0, "eval_steps": 0},
        "checkpoint": {"interval_steps": 150},
        "logging": {"tensorboard": False, "log_interval": 10},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    def answers(source) -> list[str]:
        out = gridtrain("generate", source, "--chat", "--system", SYSTEM, "--prompt-file", prompts,
                        "--max-new-tokens", "12").stdout
        return out.splitlines()

    before = answers(folder)
    assert exact(before, held_out) == 0.0, before
    gridtrain("train", tmp_path / "run.yaml", "--nproc-per-node", "2", timeout=900)
    after = answers(tmp_path / "run" / "checkpoints")
    print(f"held-out exact match: before {exact(before, held_out):.2f}, after {exact(after, held_out):.2f}")
    assert exact(after, held_out) >= 0.9, list(zip(after, held_out))

    gridtrain("convert", tmp_path / "run" / "checkpoints", "--to", "hf", "--out", tmp_path / "hf")
    assert hf_answers(tmp_path / "hf", [p for p, _ in held_out]) == after


def hf_answers(folder: Path, prompts: list[str]) -> list[str]:
    """transformers' greedy answers on apply_chat_template(..., add_generation_prompt=True) input."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for prompt in prompts:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=end, pad_token_id=end)[0, ids.shape[1]:]
        new = new.tolist()
        out.append(tokenizer.decode(new[:new.index(end)] if end in new else new))
    return out
