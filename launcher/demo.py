"""`gridtrain demo` (`make demo`): the whole path on text every machine has. The corpus is the
running interpreter's standard-library source (site-packages excluded, one .py file per
document); then a tokenizer, shards, and the tiny-llama preset trained through `gridtrain train`
on several local ranks with TP, PP and DP together. Each preparation step is skipped when its
output already exists, so a rerun goes straight to training.

Lazy import: torch (about 1.5 s) only where the demo asks how many GPUs there are, since the CLI
imports this module at start-up."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import yaml

from gridtrain.data.preprocess import PreprocessOptions, preprocess
from gridtrain.data.tokenizer_train import train_tokenizer
from gridtrain.errors import UserError

PRESET = "tiny-llama.yaml"
# On CPU: 8 ranks, TP=2 x PP=2 x DP=2, the smallest layout using all three. Measured on 2 cores:
# a step took ~3.2 s at 8 ranks vs ~3.3 s at TP=2 x PP=2 x DP=1 (4 ranks): the tiny model is
# communication- and overhead-bound, so doubling the ranks costs little besides ~10 s of start-up.
CPU_LAYOUT = (2, 2, 2)


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="stdlib corpus -> tokenizer -> shards -> train tiny-llama with TP x PP x DP",
        description="Builds everything under --dir and trains the tiny-llama preset there.")
    demo.add_argument("--dir", default="demo", help="working folder (default ./demo)")
    demo.add_argument("--layout", metavar="TP,PP,DP", help="parallel layout (default: 2,2,2 on CPU; GPUs: all of them)")
    demo.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    demo.add_argument("--vocab-size", type=int, default=8000)
    demo.add_argument("--resume", action="store_true",
                      help="continue the previous demo run (default: remove DIR/run and train from scratch)")
    demo.set_defaults(handler=demo_command)


def stdlib_files() -> list[Path]:
    """The standard library's .py files, without site-packages/dist-packages (third-party code)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return files


def build_corpus(path: Path) -> dict:
    """One JSON line per readable, non-empty stdlib source file; written under a temporary name."""
    documents = size = 0
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as out:
        for file in stdlib_files():
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                line = json.dumps({"text": text, "path": str(file)}) + "\n"
                out.write(line)
                documents += 1
                size += len(line)
    os.replace(tmp, path)
    return {"documents": documents, "bytes": size}


def default_layout() -> tuple[int, int, int]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 4 and gpus % 4 == 0:
        return 2, 2, gpus // 4
    return (1, 1, gpus) if gpus else CPU_LAYOUT


def parse_layout(text: str) -> tuple[int, int, int]:
    try:
        layout = tuple(int(x) for x in text.split(","))
        if len(layout) != 3 or min(layout) < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"--layout={text!r}: give TP,PP,DP as three positive integers, e.g. 2,2,1") from None
    return layout


def preset_path() -> Path:
    path = Path(__file__).resolve().parent.parent / "configs" / PRESET
    if not path.is_file():
        raise UserError(f"preset {PRESET} not found at {path}; run the demo from a gridtrain checkout")
    return path


def write_run_config(work: Path, layout, steps: int, vocab_size: int) -> Path:
    """The demo's overrides on top of the preset: absolute data paths, layout and run length."""
    tp, pp, dp = layout
    overrides = {
        "model": {"vocab_size": vocab_size},
        "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp,
                     "zero_stage": 1},  # DeepSpeed allows ZeRO <= 1 with its pipeline engine
        "data": {"blend": [[1.0, str(work / "data" / "corpus_text_document")]],
                 "tokenizer": str(work / "tokenizer" / "tokenizer.model")},
        "optim": {"warmup_steps": max(1, steps // 10)},
        "train": {"steps": steps, "run_dir": str(work / "run"), "eval_interval": max(1, steps // 10)},
        "checkpoint": {"interval_steps": max(1, steps // 2)},
        "logging": {"log_interval": max(1, steps // 20)},
    }
    path = work / "demo-run.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(overrides, sort_keys=False))
    os.replace(tmp, path)
    return path


MARKER = ".gridtrain-demo"


def claim_folder(work: Path) -> None:
    """The demo owns its folder: it replaces its tokenizer, shards and run there. A folder that
    holds something else (no marker of an earlier demo) is refused, so `--dir` never costs a user's
    own files."""
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise UserError(f"--dir {work}: holds files an earlier `gridtrain demo` did not write (no {MARKER}); "
                        "give a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("a folder gridtrain demo writes and replaces\n")


def prepare_data(work: Path, vocab_size: int, log) -> None:
    """Corpus, tokenizer and shards, each only if missing (a new tokenizer invalidates the shards)."""
    corpus = work / "corpus" / "stdlib.jsonl"
    if not corpus.exists():
        info = build_corpus(corpus)
        log(f"corpus: {info['documents']} stdlib files, {info['bytes'] / 1e6:.1f} MB -> {corpus}")
    model = work / "tokenizer" / "tokenizer.model"
    prefix = work / "data" / "corpus_text_document"
    info = work / "tokenizer" / "tokenizer_info.json"
    trained = json.loads(info.read_text())["vocab_size"] if info.exists() else None  # an older demo's has none
    if not model.exists() or trained != vocab_size:
        info = train_tokenizer([str(corpus)], vocab_size, str(model.parent), "bpe", 10_000_000,
                               threads=os.cpu_count() or 1, force=True)
        log(f"tokenizer: {info['vocab_size']} BPE pieces, special ids {info['special_ids']} -> {model}")
        for suffix in (".bin", ".idx"):
            Path(str(prefix) + suffix).unlink(missing_ok=True)
    if not (Path(str(prefix) + ".bin").exists() and Path(str(prefix) + ".idx").exists()):
        summary = preprocess(PreprocessOptions(inputs=(str(corpus),), tokenizer=str(model), output_prefix=str(prefix),
                                               workers=os.cpu_count() or 1, force=True))
        log(f"shards: {summary['documents']} documents, {summary['tokens']:,} tokens in {summary['seconds']:.1f} s "
            f"({summary['tokens_per_second'] / 1e3:.0f}k tokens/s) -> {prefix}.bin/.idx")


def losses(metrics: Path, since: float, kind: str) -> list[tuple[int, float]]:
    """(step, loss) of this run's "train" or "eval" records in metrics.jsonl (appended across runs)."""
    if not metrics.exists():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    key = "val_loss" if kind == "eval" else "loss"
    return [(r["step"], r[key]) for r in records if r.get("kind") == kind and r.get("time", 0) >= since]


def demo_command(args) -> int:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    work = Path(args.dir).resolve()
    layout = parse_layout(args.layout) if args.layout else default_layout()
    if args.steps < 1:
        raise UserError(f"--steps={args.steps}: use at least 1")
    started = time.time()

    def log(text: str) -> None:
        print(f"demo [{time.time() - started:5.1f} s] {text}", flush=True)

    claim_folder(work)
    prepare_data(work, args.vocab_size, log)
    run_config = write_run_config(work, layout, args.steps, args.vocab_size)
    if not args.resume:
        shutil.rmtree(work / "run", ignore_errors=True)
    tp, pp, dp = layout
    cmd = [sys.executable, "-m", "gridtrain.launcher.cli", "train", str(preset_path()), str(run_config),
           "--nproc-per-node", str(tp * pp * dp)]
    log(f"training tiny-llama, layout TP={tp} x PP={pp} x DP={dp} ({tp * pp * dp} ranks): {' '.join(cmd[3:])}")
    train_started = time.time()
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise UserError(f"training exited with status {code}; see the rank output above and {work / 'run'}")
    text = f"done in {time.time() - started:.0f} s (training {time.time() - train_started:.0f} s), layout TP={tp} PP={pp} DP={dp}"
    for kind, name in (("train", "training"), ("eval", "validation")):
        found = losses(work / "run" / "metrics.jsonl", train_started, kind)
        if found:
            text += f"; {name} loss {found[0][1]:.3f} (step {found[0][0]}) -> {found[-1][1]:.3f} (step {found[-1][0]})"
    log(text)
    return 0
