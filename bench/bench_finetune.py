"""Fine-tuning data: preprocessing throughput of `--format chat` against `--format text` on the same
tokens, and packing efficiency on a realistic length distribution.

1. Throughput. Conversations (system, 1-3 user/assistant turns, words drawn from the standard
   library's vocabulary) are written as chat records and, rendered by the tokenizer's ChatML template,
   as text records holding the rendered text without its special tokens (which the text path would
   split into pieces), so both runs encode nearly the same tokens; the chat run also renders every
   assistant turn to find the loss mask. `gridtrain preprocess --workers 2` runs each as a subprocess, alternating, best of
   ROUNDS. Ratio: chat tokens/s over text tokens/s (goal >= 0.8). The tokenizer is a byte-level BPE
   trained on the demo corpus with ChatML's special tokens and template.
2. Packing. Document lengths drawn from a log-normal distribution shaped like public chat data
   (median ~280 tokens, long tail cut at 4x the sequence; seed fixed), packed into sequences of
   seq_length + 1 = 2049 positions by gridtrain.data.finetune.pack: the fraction of positions holding
   tokens, against one document per padded sequence (data.pack: false). Goal >= 0.95.
Last line: the throughput ratio."""
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROUNDS = 3
CONVERSATIONS = 20_000
SEQ = 2048
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
          "{%- endif %}")


def tokenizer_folder(work: Path) -> Path:
    """A byte-level BPE (8000 tokens) on a sample of English-like text, with ChatML's specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    words = vocabulary()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    folder = work / "tokenizer"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": CHATML}))
    return folder


def vocabulary() -> list[str]:
    import keyword

    words = set(keyword.kwlist)
    for path in list(Path(os.__file__).parent.glob("*.py"))[:200]:
        words.update(w for w in path.read_text(errors="ignore").split() if w.isalpha() and len(w) < 12)
    return sorted(words)


def write_records(work: Path, folder: Path) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    words, rng = vocabulary(), random.Random(1)

    def say(low, high):
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    chats, texts = [], []
    for _ in range(CONVERSATIONS):
        messages = [{"role": "system", "content": say(5, 20)}]
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": say(10, 60)}, {"role": "assistant", "content": say(20, 150)}]
        chats.append(json.dumps({"messages": messages}))
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        for special in ("<|im_start|>", "<|im_end|>"):  # the text path would split them into pieces
            rendered = rendered.replace(special, "")
        texts.append(json.dumps({"text": rendered}))
    (work / "chat.jsonl").write_text("\n".join(chats) + "\n")
    (work / "text.jsonl").write_text("\n".join(texts) + "\n")
    return work / "chat.jsonl", work / "text.jsonl"


def preprocess(source: Path, folder: Path, out: Path, fmt: str) -> tuple[float, int]:
    """(seconds, tokens) of one whole `gridtrain preprocess` process."""
    cmd = [sys.executable, "-m", "gridtrain.launcher.cli", "preprocess", "--input", str(source), "--tokenizer",
           str(folder), "--output-prefix", str(out), "--format", fmt, "--workers", "2", "--force"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    return seconds, summary["tokens"]


def packing() -> tuple[float, float, int]:
    import warnings

    warnings.filterwarnings("ignore")  # megatron-core's notices at import
    from gridtrain.data.finetune import pack

    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(mean=np.log(280), sigma=0.9, size=20_000).astype(int) + 8, SEQ + 1)
    bins = pack(lengths.tolist(), SEQ + 1, packed=True)
    packed = lengths.sum() / (len(bins) * (SEQ + 1))
    padded = lengths.sum() / (len(lengths) * (SEQ + 1))
    return float(packed), float(padded), int(np.median(lengths))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = tokenizer_folder(work)
        chat, text = write_records(work, folder)
        best = {"chat": (float("inf"), 0), "text": (float("inf"), 0)}
        for _ in range(ROUNDS):
            for fmt, source in (("text", text), ("chat", chat)):
                seconds, tokens = preprocess(source, folder, work / fmt, fmt)
                best[fmt] = min(best[fmt], (seconds, tokens))
    rates = {fmt: tokens / seconds for fmt, (seconds, tokens) in best.items()}
    packed, padded, median = packing()
    print(f"{'':32} {'seconds':>8} {'tokens':>10} {'tokens/s':>10}")
    for fmt in ("text", "chat"):
        print(f"preprocess --format {fmt:<12} {best[fmt][0]:8.2f} {best[fmt][1]:10d} {rates[fmt]:10.0f}")
    print(f"packing efficiency (median {median} tokens, sequences of {SEQ + 1}): packed {packed:.3f}, "
          f"one per sequence {padded:.3f}")
    print(f"chat / text preprocess throughput: {rates['chat'] / rates['text']:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
