"""Conversion and generation, each against a baseline measured in the same run:

1. Export: `gridtrain convert CKPT --to hf` of a 24-layer, hidden-1024 llama checkpoint (ZeRO-0,
   1 rank) against safetensors alone writing the same tensors (save_file + fsync, the tensors
   already in memory); and the export's peak memory against its largest layer. Peak memory is
   sampled from /proc in the exporting process: anonymous memory (what the converter itself holds)
   above what it held before the first tensor, and the resident total (which also counts pages of
   the memory-mapped checkpoint, cache the kernel reclaims under pressure).
2. GGUF export of the same checkpoint per --dtype (f32, f16, bf16, q8_0, q4_0): time and file
   size, against the HF export's time and the f32 file's size.
3. Generation: tokens/s of gridtrain's generation (KV cache, greedy) against transformers'
   `generate` on the exported model, the same prompts, CPU, alternating runs, medians.

Run: `make bench` or `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_convert.py`.
Last line: the generation ratio (gridtrain tokens/s over transformers tokens/s; target >= 1.0)."""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from single_rank import single_rank_env

EXPORT_MODEL = dict(family="llama", vocab_size=8000, hidden_size=1024, num_layers=24, num_attention_heads=16,
                    max_seq_len=512)
GENERATE_MODEL = dict(family="llama", vocab_size=2048, hidden_size=512, num_layers=8, num_attention_heads=8,
                      num_kv_heads=4, max_seq_len=256, init_std=0.05)
PROMPTS = ["def main(argv):\n    ", "import os\nimport sys\n\n", "class Parser(object):\n    def __init__(self",
           "    for line in lines:\n        "]
NEW_TOKENS, REPEATS = 48, 3


def tokenizer(root: Path) -> str:
    from gridtrain.data.tokenizer_train import train_tokenizer
    from gridtrain.launcher.demo import build_corpus

    build_corpus(root / "corpus.jsonl")
    return train_tokenizer([str(root / "corpus.jsonl")], 2000, str(root / "tok"), "bpe", 3_000_000, threads=2)["model"]


def save_checkpoint(root: Path, fields: dict, tokenizer_model: str) -> Path:
    """A one-rank ZeRO-0 checkpoint of a freshly initialised model, through the Checkpointer."""
    from gridtrain.model.config import ModelConfig
    from gridtrain.parallel import groups
    from gridtrain.parallel.config import OptimConfig, ParallelConfig
    from gridtrain.parallel.engine import build_engine
    from gridtrain.train.checkpoint.checkpointer import Checkpointer, RunRecord
    from gridtrain.train.checkpoint.config import CheckpointConfig
    from gridtrain.train.checkpoint.state import TrainState

    model = ModelConfig(**fields)
    ctx = groups.initialize_single(ParallelConfig())
    engine = build_engine(ctx, model, OptimConfig(), seed=1)
    record = RunRecord(ckpt_dir=root / "checkpoints", model=model, tokenizer=tokenizer_model)
    path = Checkpointer(CheckpointConfig(), ctx.layout, record).save(engine, TrainState(step=1)).path
    del engine
    groups.destroy(world=False)
    return path


class MemorySampler:
    """Peak RssAnon and VmRSS of this process, sampled every 5 ms on a thread."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> dict:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in self.peak:
                values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.now().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def export_child(mode: str, ckpt: str, out: str, result: str) -> None:
    """In a process of its own, so its memory is its own: the whole export ("export"), or the
    weight streaming alone after the source is open ("stream")."""
    from gridtrain.convert import hf_export
    from gridtrain.convert.sources import layer_names, open_weights

    source = open_weights(ckpt)
    layers = layer_names(source).values()
    largest = max(sum(4 * _numel(source.shape(n)) for n in names) for names in layers)
    sampler = MemorySampler()
    before = sampler.now()
    with sampler:
        start = time.perf_counter()
        if mode == "export":
            hf_export.export_hf(source, Path(out), "fp32", 5 * 10**9, force=False, tokenizer=source.tokenizer)
        else:
            Path(out).mkdir()
            hf_export.write_weights(source, Path(out), "fp32", 5 * 10**9)
        seconds = time.perf_counter() - start
    Path(result).write_text(json.dumps({"seconds": seconds, "before": before, "peak": sampler.peak,
                                        "largest_layer": largest}))


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def safetensors_baseline(exported: Path, target: Path) -> tuple[float, int]:
    """Seconds for safetensors alone to write the exported tensors (in memory) again, + fsync."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for path in sorted(exported.glob("*.safetensors")):
        tensors.update({k: v.clone() for k, v in load_file(str(path)).items()})
    start = time.perf_counter()
    save_file(tensors, str(target), metadata={"format": "pt"})
    with open(target, "rb") as fh:
        os.fsync(fh.fileno())
    return time.perf_counter() - start, target.stat().st_size


def run_child(mode: str, ckpt: Path, out: Path) -> dict:
    result = out.with_suffix(".json")
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(ckpt), str(out), str(result)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def bench_export(root: Path, tokenizer_model: str) -> tuple[float, list]:
    ckpt = save_checkpoint(root / "export", EXPORT_MODEL, tokenizer_model)
    export, stream = (run_child(mode, ckpt, root / f"hf-{mode}") for mode in ("export", "stream"))
    baseline, nbytes = safetensors_baseline(root / "hf-export", root / "baseline.safetensors")
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    held = export["peak"]["RssAnon"] - export["before"]["RssAnon"]
    streamed = stream["peak"]["RssAnon"] - stream["before"]["RssAnon"]
    return export["seconds"], [
        ("export: llama 24 layers, hidden 1024 (ZeRO-0 checkpoint)", f"{export['seconds']:.2f} s",
         f"{nbytes / 1e9:.2f} GB of safetensors, {nbytes / 1e9 / export['seconds']:.2f} GB/s"),
        ("safetensors save_file of the same tensors + fsync", f"{baseline:.2f} s", f"{nbytes / 1e9 / baseline:.2f} GB/s"),
        ("export time / safetensors alone", f"{export['seconds'] / baseline:.2f}", "includes reading the checkpoint"),
        ("largest layer (fp32)", mib(export["largest_layer"]), ""),
        ("export: anonymous memory above its start", mib(held),
         f"{mib(export['before']['RssAnon'])} before; includes loading transformers and the tokenizer conversion"),
        ("weight streaming: anonymous memory above its start", mib(streamed),
         f"{streamed / export['largest_layer']:.2f} x largest layer (target <= ~2x)"),
        ("export: peak resident total", mib(export["peak"]["VmRSS"]),
         "includes touched pages of the memory-mapped checkpoint (page cache, reclaimable)"),
    ]


def bench_gguf(root: Path, hf_seconds: float) -> list:
    """Each GGUF dtype of the export checkpoint, written by the exporter in this process."""
    from gridtrain.convert.gguf_export import GGUF_DTYPES, export_gguf
    from gridtrain.convert.sources import open_weights

    source = open_weights(str(root / "export" / "checkpoints"))
    rows, sizes = [], {}
    for dtype in GGUF_DTYPES:
        start = time.perf_counter()
        path = export_gguf(source, root / f"model-{dtype}.gguf", dtype, force=False)
        seconds = time.perf_counter() - start
        sizes[dtype] = path.stat().st_size
        rows.append((f"gguf export --dtype {dtype}", f"{seconds:.2f} s",
                     f"{sizes[dtype] / 1e6:,.0f} MB ({sizes[dtype] / sizes['f32']:.2f} of f32), "
                     f"{seconds / hf_seconds:.2f} x the HF export's time"))
        path.unlink()
    return rows


def bench_generation(root: Path, tokenizer_model: str) -> tuple[list, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from gridtrain.convert.generate import load_generator
    from gridtrain.model.generation import Sampling, generate

    ckpt = save_checkpoint(root / "gen", GENERATE_MODEL, tokenizer_model)
    subprocess.run([sys.executable, "-m", "gridtrain.launcher.cli", "convert", str(ckpt), "--to", "hf",
                    "--out", str(root / "gen-hf")], check=True, capture_output=True)
    ours = load_generator(str(ckpt), "cpu")
    theirs = AutoModelForCausalLM.from_pretrained(str(root / "gen-hf")).eval()
    prompts = [ours.prompt_ids(p) for p in PROMPTS]
    stops = ours.tokenizer.stop_ids

    def run_ours():
        return [generate(ours.decoder, [p], Sampling(NEW_TOKENS), stops)[0] for p in prompts]

    def run_theirs():
        with torch.inference_mode():
            return [theirs.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
                    for p in prompts]

    times = {"gridtrain": [], "transformers": []}
    outputs = {}
    for repeat in range(REPEATS + 1):  # the first round warms both up
        for name, fn in (("gridtrain", run_ours), ("transformers", run_theirs))[::1 if repeat % 2 else -1]:
            start = time.perf_counter()
            outputs[name] = fn()
            if repeat:
                times[name].append(time.perf_counter() - start)
    tokens = {name: sum(len(o) for o in out) for name, out in outputs.items()}
    rate = {name: tokens[name] / statistics.median(times[name]) for name in times}
    same = outputs["gridtrain"] == outputs["transformers"]
    rows = [(f"generation: llama h=512 L=8 GQA, {len(PROMPTS)} prompts x {NEW_TOKENS} tokens, greedy, 1 thread", "", ""),
            ("transformers generate", f"{rate['transformers']:,.1f} tok/s", f"median of {REPEATS}"),
            ("gridtrain generate (KV cache)", f"{rate['gridtrain']:,.1f} tok/s", f"same tokens: {same}")]
    return rows, rate["gridtrain"] / rate["transformers"]


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        export_child(*sys.argv[2:])
        return 0
    single_rank_env()
    base = os.environ.get("GRIDTRAIN_BENCH_DIR", tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="gridtrain-bench-convert-", dir=base) as tmp:
        root = Path(tmp)
        tokenizer_model = tokenizer(root)
        hf_seconds, rows = bench_export(root, tokenizer_model)
        rows += bench_gguf(root, hf_seconds)
        generation, ratio = bench_generation(root, tokenizer_model)
    rows += generation
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")
    print(f"generation tokens/s, gridtrain / transformers generate: {ratio:.2f} (target >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
