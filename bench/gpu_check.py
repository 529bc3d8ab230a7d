"""`make gpu-check`: the CUDA path, on one GPU, in a few minutes, offline.

Refuses to run without CUDA (one line, exit 2). On a node lacking deepspeed / megatron-core /
gridtrain it installs the wheels `make gpu-wheels` wrote into gpu-wheels/ (`pip install --no-index`
into a temporary target). Then: the `gridtrain env` report; a Llama of about 1B parameters trained
in bf16 through `gridtrain train` (DP=1, ZeRO-1) with activation checkpointing off and on: tokens/s,
MFU against the GPU's datasheet bf16 dense peak, peak memory against the dry-run estimate; which
SDPA kernel runs; the same model in a plain PyTorch bf16 loop on the same batches (the engine's
overhead); a run killed after its checkpoint and resumed, against the uninterrupted losses; and the
Hugging Face export's logits against gridtrain's. A table; the last line is the MFU.

Run: make gpu-check (GPU_WHEELS=dir to point at the bundle)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bf16 dense peak FLOP/s per GPU from the vendors' datasheets (SXM parts; no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "B200": 2250e12, "GH200": 989e12}
# About 1.04B parameters (Llama-3.2-1B's widths, a 32k vocabulary).
MODEL = {"family": "llama", "vocab_size": 32000, "hidden_size": 2048, "num_layers": 16, "num_attention_heads": 32,
         "num_kv_heads": 8, "ffn_hidden_size": 8192, "max_seq_len": 2048, "tie_embeddings": True}
STEPS, SEQ, MICRO, GLOBAL = 30, 2048, 4, 16


def refuse_without_cuda() -> None:
    try:
        import torch
    except ImportError:
        print(f"gpu-check: {sys.executable} cannot import torch; run it with the node's Python that has a CUDA "
              "build of torch (make gpu-check PYTHON=...)", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU node",
              file=sys.stderr)
        sys.exit(2)


def ensure_stack(env: dict) -> dict:
    """Install the bundle into a temporary target if the stack is missing; the env for children."""
    missing = [m for m in ("deepspeed", "megatron.core", "gridtrain") if not _importable(m)]
    if not missing:
        return env
    wheels = Path(os.environ.get("GPU_WHEELS", ROOT / "gpu-wheels"))
    if not list(wheels.glob("*.whl")):
        print(f"gpu-check: {', '.join(missing)} missing and no wheels in {wheels}; run `make gpu-wheels` where "
              "a registry is reachable and copy the folder here", file=sys.stderr)
        sys.exit(2)
    target = Path(tempfile.mkdtemp(prefix="gridtrain-gpu-site-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    *map(str, sorted(wheels.glob("*.whl")))], check=True)
    sys.path.insert(0, str(target))
    return {**env, "PYTHONPATH": os.pathsep.join([str(target), env.get("PYTHONPATH", "")])}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module.split(".")[0]) is not None and (
        "." not in module or importlib.util.find_spec(module) is not None)


def gridtrain(env: dict, *args, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gridtrain.launcher.cli", *map(str, args)], env=env, check=check,
                          capture_output=True, text=True, **kwargs)


def prepare_data(work: Path, env: dict) -> dict:
    """A tokenizer and shards of the interpreter's standard library (no download)."""
    code = ("import sys; from pathlib import Path; from gridtrain.launcher.demo import build_corpus; "
            "build_corpus(Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(work / "corpus.jsonl")], env=env, check=True)
    gridtrain(env, "tokenizer", "train", "--input", work / "corpus.jsonl", "--vocab-size", 8000, "--out", work / "tok",
              "--sample-bytes", 5_000_000)
    gridtrain(env, "preprocess", "--input", work / "corpus.jsonl", "--tokenizer", work / "tok" / "tokenizer.model",
              "--output-prefix", work / "data" / "stdlib", "--workers", 8)
    return {"blend": [[1.0, str(work / "data" / "stdlib_text_document")]], "tokenizer": str(work / "tok" / "tokenizer.model")}


def write_config(work: Path, name: str, data: dict, peak: float, steps: int, checkpointing: bool, interval: int) -> Path:
    import yaml

    config = {"model": {**MODEL, "activation_checkpointing": checkpointing},
              "parallel": {"zero_stage": 1, "data_parallel": 1},
              "data": {**data, "seq_length": SEQ, "split": "99,1,0"},
              "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 5},
              "train": {"steps": steps, "global_batch_size": GLOBAL, "micro_batch_size": MICRO, "dtype": "bf16",
                        "run_dir": str(work / name), "eval_interval": 0, "peak_flops": peak},
              "checkpoint": {"interval_steps": interval}, "logging": {"tensorboard": False, "log_interval": 1}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train_run(env: dict, config: Path) -> dict:
    started = time.perf_counter()
    proc = gridtrain(env, "train", config, "--nproc-per-node", 1, "--no-resume", check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training {config.name} failed:\n{proc.stderr[-3000:]}")
    steady = records(Path(config.parent / config.stem))[2:]
    return {"seconds": time.perf_counter() - started, "tok_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "mfu": sum(r["mfu"] for r in steady) / len(steady), "mem_mb": max(r["mem_max_mb"] for r in steady),
            "losses": [r["loss"] for r in records(Path(config.parent / config.stem))]}


def dry_run_memory_mb(env: dict, config: Path) -> float:
    import yaml

    out = yaml.safe_load(gridtrain(env, "train", config, "--dry-run", "--device", "cuda", "--nproc-per-node", 1).stdout)
    return out["derived"]["memory_per_rank_bytes"]["total"] / 2**20


def kill_and_resume(env: dict, work: Path, data: dict, peak: float) -> tuple[list, list]:
    """(uninterrupted losses, losses of a run SIGKILLed after its step-10 checkpoint and resumed)."""
    reference = train_run(env, write_config(work, "ref", data, peak, 20, False, 10))["losses"]
    config = write_config(work, "killed", data, peak, 20, False, 10)
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "gridtrain.launcher.cli", "train", str(config),
                             "--nproc-per-node", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = work / "killed" / "checkpoints" / "step_00000010"
    while not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(2.0)  # a few more steps, lost to the kill
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.send_signal(signal.SIGKILL)  # the ranks run in sessions of their own: kill each, at once
    proc.wait()
    gridtrain(env, "train", config, "--nproc-per-node", 1)
    resumed = {r["step"]: r["loss"] for r in records(work / "killed")}  # later records of a step win
    return reference, [resumed[step] for step in sorted(resumed)]


def sdpa_kernel(model: dict) -> str:
    """Which kernel scaled_dot_product_attention runs for this model's causal attention in bf16."""
    import torch
    import torch.nn.functional as F

    heads, d = model["num_attention_heads"], model["hidden_size"] // model["num_attention_heads"]
    q, k, v = (torch.randn(MICRO, heads, SEQ, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    for mark, kernel in (("flash", "flash"), ("cudnn", "cudnn"), ("efficient", "memory-efficient"), ("fmha", "memory-efficient")):
        if mark in names:
            return kernel
    return "math"


def _batches(data: dict, count: int):
    """The first `count` micro-batches of the training data, as the trainer reads them."""
    from gridtrain.data.config import DataConfig
    from gridtrain.data.datasets import build_datasets, run_samples
    from gridtrain.data.loader import batches
    from gridtrain.data.tokenizer import SentencePieceTokenizer

    cfg = DataConfig(blend=tuple(tuple(b) for b in data["blend"]), tokenizer=data["tokenizer"], seq_length=SEQ, split="99,1,0")
    train = build_datasets(cfg, run_samples(count * MICRO // GLOBAL + 1, GLOBAL, 0), tempfile.mkdtemp(),
                           SentencePieceTokenizer(data["tokenizer"]))[0]
    loader = batches(train, 0, MICRO, 0, 1, cfg)
    return [next(loader) for _ in range(count)]


def plain_loop_tokens_per_s(model: dict, data: dict, steps: int) -> float:
    """The same Decoder in plain PyTorch: fp32 weights, bf16 autocast, fused AdamW, same batches."""
    import torch

    from gridtrain.model.config import ModelConfig
    from gridtrain.model.decoder import Decoder
    from gridtrain.model.loss import lm_loss
    from gridtrain.parallel import groups
    from gridtrain.parallel.config import ParallelConfig
    from gridtrain.parallel.optim import param_groups

    groups.initialize_single(ParallelConfig())
    decoder = Decoder(ModelConfig(**model), tp_size=1, seed=1234).cuda()
    optimizer = torch.optim.AdamW(param_groups(decoder, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)
    accum = GLOBAL // MICRO
    micro = [{k: v.cuda() for k, v in b.items()} for b in _batches(data, accum * (steps + 2))]
    times = []
    for step in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in micro[step * accum:(step + 1) * accum]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = decoder(batch["tokens"], batch["position_ids"], batch["segment_ids"])
            (lm_loss(logits, batch["labels"], batch["loss_mask"]) / accum).backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del decoder, optimizer
    groups.destroy()
    return GLOBAL * SEQ / (sum(times[2:]) / steps)


def export_logits_gap(env: dict, checkpoints: Path, out: Path) -> float:
    """Max |logit| difference between transformers on the exported folder and gridtrain's Decoder
    on the checkpoint, fp32 (TF32 off), on the GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from gridtrain.convert.generate import load_decoder
    from gridtrain.convert.sources import open_weights
    from gridtrain.parallel import groups

    gridtrain(env, "convert", checkpoints, "--to", "hf", "--out", out)
    torch.backends.cuda.matmul.allow_tf32 = False
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).cuda().eval()
    ours = load_decoder(open_weights(checkpoints), "cuda")
    tokens = torch.randint(0, 8000, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        mine = ours(tokens, torch.arange(128, device="cuda").expand(2, 128), torch.zeros_like(tokens))
        gap = (mine[..., :MODEL["vocab_size"]] - theirs(tokens).logits).abs().max().item()
    groups.destroy()
    return gap


def main() -> int:
    refuse_without_cuda()
    import torch

    env = ensure_stack({**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    name = torch.cuda.get_device_name(0)
    peak = next((flops for key, flops in PEAK_BF16.items() if key in name), None)
    print(gridtrain(env, "env").stdout, flush=True)
    rows = [("device", name, f"datasheet bf16 dense peak {peak / 1e12:.0f} TFLOP/s" if peak else "peak unknown: MFU against a matmul probe")]
    with tempfile.TemporaryDirectory(prefix="gridtrain-gpu-check-") as tmp:
        work = Path(tmp)
        data = prepare_data(work, env)
        for checkpointing in (False, True):
            config = write_config(work, f"ckpt-{'on' if checkpointing else 'off'}", data, peak, STEPS, checkpointing, 0)
            run, estimate = train_run(env, config), dry_run_memory_mb(env, config)
            rows.append((f"gridtrain train, 1.1B llama bf16 ZeRO-1, activation checkpointing {'on' if checkpointing else 'off'}",
                         f"{run['tok_s']:,.0f} tok/s", f"MFU {run['mfu']:.1%}; peak memory {run['mem_mb']:,.0f} MB "
                         f"(dry-run weights+grads+optimizer {estimate:,.0f} MB; the rest is activations)"))
            if not checkpointing:
                engine_tok_s, mfu = run["tok_s"], run["mfu"]
        rows.append(("SDPA kernel at this model's shapes (bf16)", sdpa_kernel(MODEL), "from the profiler's CUDA kernels"))
        plain = plain_loop_tokens_per_s(MODEL, data, steps=8)
        rows.append(("plain PyTorch bf16 loop (same model, batches, AdamW)", f"{plain:,.0f} tok/s",
                     f"engine / plain {engine_tok_s / plain:.2f}"))
        reference, resumed = kill_and_resume(env, work, data, peak)
        rows.append(("SIGKILL after the step-10 checkpoint, resume", "identical" if reference == resumed else "DIFFERENT",
                     f"{sum(a == b for a, b in zip(reference, resumed))} of {len(reference)} losses equal"))
        gap = export_logits_gap(env, work / "ref" / "checkpoints", work / "hf")
        rows.append(("HF export: transformers vs gridtrain logits (fp32)", f"{gap:.2e}", "max abs difference"))
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>16}  {note}")
    print(f"MFU (bf16, activation checkpointing off, against the datasheet peak): {mfu:.1%}")
    return 0 if reference == resumed and gap <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
