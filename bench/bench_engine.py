"""Engine benchmark, two parts measured in this run:

1. Engine overhead on 1 rank: tokens/s of gridtrain's TrainEngine (DeepSpeed, ZeRO-0, fp32,
   clipping) against a plain PyTorch loop over the same Decoder, the same batches and the same
   work (forward, lm_loss, backward with gradient accumulation, clip_grad_norm_, torch AdamW step).
   Steps alternate between the two so both see the same machine load; ratios use the median.
2. Optimizer-state memory per rank at DP=2 under ZeRO 0/1/2/3 (2 ranks launched by torch's elastic
   agent): fp32 master weights, Adam moments and gradients actually held, read from the DeepSpeed
   optimizer's tensors (distinct storages), against the ZeRO paper's formulas
   (gridtrain.parallel.memory_estimate.zero_memory_per_rank).

Run: `make bench` or `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_engine.py`.
Last line: the headline ratio (engine tokens/s over plain PyTorch tokens/s, CPU time).
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from single_rank import single_rank_env, start_engine

VOCAB, HIDDEN, LAYERS, HEADS, SEQ, MICRO, ACCUM = 8000, 256, 4, 8, 256, 4, 2
WARMUP_STEPS, TIMED_STEPS = 2, 6
MEMORY_MODEL = dict(vocab_size=8000, hidden_size=256, num_layers=4, num_attention_heads=8, num_kv_heads=4)


def run_config(model_fields: dict, zero_stage: int, global_batch: int, micro: int, seq: int = SEQ, dtype: str = "fp32"):
    from gridtrain.data.config import DataConfig
    from gridtrain.model.config import ModelConfig
    from gridtrain.parallel.config import OptimConfig, ParallelConfig
    from gridtrain.train.config import TrainConfig
    from gridtrain.train.run_config import RunConfig

    return RunConfig(
        model=ModelConfig(family="llama", max_seq_len=seq, **model_fields),
        parallel=ParallelConfig(zero_stage=zero_stage),
        data=DataConfig(seq_length=seq),
        optim=OptimConfig(lr=3e-4, weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(global_batch_size=global_batch, micro_batch_size=micro, seed=1234, dtype=dtype),
    )


def synthetic_batches(count: int, micro: int, seq: int = SEQ, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        seqs = torch.randint(0, VOCAB, (micro, seq + 1), generator=gen)
        out.append({"tokens": seqs[:, :-1].contiguous(), "labels": seqs[:, 1:].contiguous(),
                    "position_ids": torch.arange(seq).expand(micro, seq).contiguous(),
                    "segment_ids": torch.zeros(micro, seq, dtype=torch.long), "loss_mask": torch.ones(micro, seq)})
    return out


class PlainLoop:
    """The baseline: the same Decoder and AdamW groups, no DeepSpeed."""

    def __init__(self, cfg):
        from gridtrain.model.decoder import Decoder
        from gridtrain.parallel.optim import build_optimizer

        self.cfg = cfg
        self.model = Decoder(cfg.model, 1, cfg.train.seed)
        self.optimizer = build_optimizer(self.model, cfg.optim)

    def train_step(self, batches: list[dict]) -> float:
        from gridtrain.model.loss import lm_loss

        total = 0.0
        for batch in batches:
            logits = self.model(batch["tokens"], batch["position_ids"], batch["segment_ids"])
            loss = lm_loss(logits, batch["labels"], batch["loss_mask"])
            (loss / len(batches)).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(batches)


def timed(step, batches) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    step(batches)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_overhead() -> dict:
    """Median wall and CPU seconds per step of TrainEngine and of the plain loop, alternating."""
    single_rank_env()
    from gridtrain.parallel import groups

    model = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS)
    cfg = run_config(model, zero_stage=0, global_batch=MICRO * ACCUM, micro=MICRO)
    _, engine = start_engine(cfg)
    plain = PlainLoop(cfg)
    batches = synthetic_batches(ACCUM, MICRO)
    runs = {"gridtrain": lambda b: engine.train_step(iter(b)), "plain": plain.train_step}
    times = {name: [] for name in runs}
    for step in range(WARMUP_STEPS + TIMED_STEPS):
        for name, fn in (runs.items() if step % 2 else reversed(runs.items())):
            result = timed(fn, batches)
            if step >= WARMUP_STEPS:
                times[name].append(result)
    groups.destroy()
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


# ---- part 2: optimizer-state memory at DP=2 (runs inside each of the 2 launched ranks) ----

def tensors_in(obj, depth: int = 0):
    """Tensors inside an optimizer attribute (tensor, or lists/dicts of them, a few levels deep)."""
    if torch.is_tensor(obj):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item, depth + 1)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once)."""
    seen = {}
    for t in tensors:
        if t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def gradient_tensors(ds_engine) -> list:
    """Every gradient the rank holds now: the model parameters' .grad and the ZeRO optimizer's own
    gradient buffers (averaged / partitioned / contiguous gradient storage)."""
    grads = [p.grad for p in ds_engine.module.parameters() if p.grad is not None]
    if ds_engine.zero_optimization_stage() > 0:
        for name, value in vars(ds_engine.optimizer).items():
            if "grad" in name.lower() and "norm" not in name.lower():
                grads.extend(tensors_in(value))
    return grads


def optimizer_tensors(ds_engine) -> tuple[list, list]:
    """(fp32 master weights, Adam moments) held by the optimizer. At ZeRO-0 in fp32 the torch AdamW
    steps the model weights themselves: no separate master copy (the formula counts none either);
    in bf16 DeepSpeed's wrapper holds fp32 copies (fp32_groups)."""
    stage = ds_engine.zero_optimization_stage()
    wrapped = stage or ds_engine.bfloat16_enabled()
    inner = ds_engine.optimizer.optimizer if wrapped else ds_engine.optimizer
    moments = [v for state in inner.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    name = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups",
            3: "fp32_partitioned_groups_flat"}.get(stage, "fp32_groups" if wrapped else None)
    master = list(tensors_in(getattr(ds_engine.optimizer, name))) if name else []
    return master, moments


def measure_zero_stage(stage: int, dtype: str) -> dict:
    from gridtrain.parallel import groups

    cfg = run_config(MEMORY_MODEL, zero_stage=stage, global_batch=8, micro=2, seq=64, dtype=dtype)
    _, engine = start_engine(cfg)
    ds = engine.ds_engine
    peak_grads = [0]
    original_step = ds.step

    def step_and_sample(*args, _ds=ds, **kwargs):
        # After each micro-batch's backward: the most gradient memory a step cycle holds.
        peak_grads[0] = max(peak_grads[0], storage_bytes(gradient_tensors(_ds)))
        return original_step(*args, **kwargs)

    ds.step = step_and_sample
    for seed in range(2):  # the second step runs with the Adam moments allocated
        engine.train_step(iter(synthetic_batches(engine.grad_accum_steps, 2, seq=64, seed=seed)))
    master, moments = optimizer_tensors(ds)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in ds.module.parameters())
    result = {"stage": stage, "dtype": dtype, "params": params, "master_weights": storage_bytes(master),
              "adam_moments": storage_bytes(moments), "gradients": peak_grads[0]}
    del engine, ds
    groups.destroy(world=False)
    return result


def memory_worker(out_path: str) -> None:
    from gridtrain.parallel import groups

    results = [measure_zero_stage(stage, dtype) for dtype in ("fp32", "bf16") for stage in range(4)]
    per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, results)
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps(per_rank))
    groups.destroy()


def measure_memory() -> list[list[dict]]:
    """Launch memory_worker on 2 ranks; returns per rank a list of per-stage measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=0",
               __file__, "--memory-worker", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def memory_rows(per_rank: list[list[dict]]) -> tuple[list, float]:
    from gridtrain.parallel.memory_estimate import zero_memory_per_rank

    rows, worst = [], 0.0
    for index, run in enumerate(per_rank[0]):
        stage, dtype = run["stage"], run["dtype"]
        measured = max((rank[index] for rank in per_rank), key=lambda r: r["master_weights"] + r["adam_moments"] + r["gradients"])
        formula = zero_memory_per_rank(measured["params"], 2, stage, dtype)
        parts = ("master_weights", "adam_moments", "gradients")
        got, want = sum(measured[k] for k in parts), sum(formula[k] for k in parts)
        worst = max(worst, abs(got / want - 1))
        short = {"master_weights": "fp32 master", "adam_moments": "Adam m+v", "gradients": "grads"}
        detail = ", ".join(f"{short[k]} {measured[k] / 2**20:.1f}/{formula[k] / 2**20:.1f}" for k in parts)
        rows.append((f"{dtype} ZeRO-{stage} DP=2 optimizer-state memory per rank", f"{got / 2**20:.1f} MiB",
                     f"paper formula {want / 2**20:.1f} MiB ({got / want - 1:+.3%}); measured/formula MiB: {detail}"))
    return rows, worst


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        memory_worker(sys.argv[2])
        return 0
    times = measure_overhead()
    memory, worst = memory_rows(measure_memory())
    tokens = MICRO * ACCUM * SEQ
    rows = [(f"llama h={HIDDEN} L={LAYERS} vocab={VOCAB} seq={SEQ}, {ACCUM} x {MICRO} samples/step, 1 rank", "", "")]
    for name in ("plain", "gridtrain"):
        wall, cpu = times[name]
        label = "plain PyTorch loop" if name == "plain" else "gridtrain TrainEngine (DeepSpeed ZeRO-0)"
        rows.append((label, f"{tokens / cpu:,.0f} tok/CPU-s", f"{tokens / wall:,.0f} tok/s wall (median of {TIMED_STEPS})"))
    wall_ratio = times["plain"][0] / times["gridtrain"][0]
    rows.append(("engine / plain, wall time", f"{wall_ratio:.3f}", "target >= 0.90"))
    rows += memory
    rows.append(("largest deviation from the ZeRO formulas", f"{worst:.3%}", "target <= 5%"))
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")
    # Headline on CPU time: on this shared 2-core machine wall time also measures the neighbours.
    print(f"engine overhead ratio (gridtrain / plain PyTorch tokens per CPU-second): "
          f"{times['plain'][1] / times['gridtrain'][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
