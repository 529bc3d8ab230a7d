"""Per-step training metrics: loss, LR, grad norm, step time, tokens/s, MFU, per-rank memory and
consumed samples, written by rank 0 to the console (one compact line), <run_dir>/metrics.jsonl and
TensorBoard (<run_dir>/tensorboard).

Lazy imports, each only when the logging section turns its sink on: wandb (an optional dependency,
the `wandb` extra) and TensorBoard's writer (about 1 s to import)."""
import json
import math
import secrets
import time
from pathlib import Path

import psutil
import torch

from gridtrain.parallel.collectives import gather_ints, rank_and_world, sum_over_ranks
from gridtrain.train.config import LoggingConfig


def measure_matmul_flops(device: torch.device, size: int = 1024, seconds: float = 0.5) -> float:
    """Peak fp32 FLOP/s of one device as the best of repeated size x size matmuls (2*n^3 FLOPs
    each), with the current thread count. Best-of rather than mean: the peak is what the hardware
    can reach; noise from neighbours only ever slows a run down."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)  # warm-up: first call pays allocation and kernel selection
    best = math.inf
    deadline = time.perf_counter() + seconds
    repeats = 0
    while repeats < 3 or time.perf_counter() < deadline:
        best = min(best, _matmul_seconds(a, b, device))
        repeats += 1
    return 2.0 * size**3 / best


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    """Duration of one matmul. On CPU, also the process's CPU time spread over its threads: when
    other processes share the cores (ranks of one node, other jobs) the wall time includes their
    time slices, the CPU time does not, so the probe still finds the cores' own peak."""
    _synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    torch.mm(a, b)
    _synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if device.type == "cuda":
        return wall
    return min(wall, max(cpu / torch.get_num_threads(), 1e-9))


def total_peak_flops(peak_flops: float | None, device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s of all ranks together and where the per-device figure came from: the config's
    train.peak_flops, or else every rank's own matmul probe, run at the same time so ranks sharing
    a host measure what they get while sharing it. Collective when probing."""
    world = rank_and_world()[1]
    if peak_flops is not None:
        return peak_flops * world, f"train.peak_flops = {peak_flops:.3e} FLOP/s per device"
    total = sum_over_ranks(measure_matmul_flops(device))
    return total, f"measured by an fp32 matmul probe: {total / world:.3e} FLOP/s per device (mean of {world})"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bytes(device: torch.device) -> int:
    """This rank's memory: peak CUDA allocation on GPU, resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(psutil.Process().memory_info().rss)


def gather_memory(device: torch.device) -> list[int]:
    """memory_bytes of every rank, in rank order. Collective: every rank must call it."""
    return gather_ints(memory_bytes(device))


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_total: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the peak FLOP/s of all ranks together."""
    return flops_per_token * tokens_per_s / peak_flops_total


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a double past ~709


def step_record(step: int, loss: float, grad_norm: float, lr: float, step_time: float, tokens: int,
                flops_per_token: float, peak_flops_total: float, memory: list[int],
                consumed_samples: int) -> dict:
    """One training step's metrics as a flat JSON-ready dict; `tokens` is the global batch's."""
    tokens_per_s = tokens / step_time
    return {
        "kind": "train",
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": flops_per_token * tokens_per_s / 1e12,
        "mfu": mfu(flops_per_token, tokens_per_s, peak_flops_total),
        "mem_bytes_per_rank": memory,
        "mem_max_mb": max(memory) / 2**20,
        "consumed_samples": consumed_samples,
        "time": time.time(),
    }


def eval_record(step: int, loss: float) -> dict:
    return {"kind": "eval", "step": step, "val_loss": loss, "val_ppl": perplexity(loss), "time": time.time()}


def checkpoint_record(step: int, path: str, nbytes: int, seconds: float, stall: float | None = None,
                      published_at: float | None = None) -> dict:
    """A published checkpoint: where, how big, how long from the start of its save to its publication
    (`ckpt_write_s`) and how much of that stalled training (`ckpt_stall_s`: all of it unless the
    save ran in the background)."""
    return {"kind": "checkpoint", "step": step, "path": str(path), "ckpt_bytes": nbytes, "ckpt_write_s": seconds,
            "ckpt_stall_s": seconds if stall is None else stall,
            "ckpt_gb_per_s": nbytes / seconds / 1e9 if seconds > 0 else 0.0, "time": published_at or time.time()}


def format_record(record: dict, total_steps: int) -> str:
    """The compact console line of a train, eval or checkpoint record."""
    head = f"step {record['step']:>{len(str(total_steps))}}/{total_steps}"
    if record["kind"] == "eval":
        return f"{head} | val loss {record['val_loss']:.4f} | val ppl {record['val_ppl']:.2f}"
    if record["kind"] == "checkpoint":
        return (f"{head} | checkpoint {Path(record['path']).name}: {record['ckpt_bytes'] / 1e6:,.1f} MB in "
                f"{record['ckpt_write_s']:.2f} s ({record['ckpt_gb_per_s']:.3f} GB/s)"
                + (f", training stalled {record['ckpt_stall_s']:.2f} s" if record["ckpt_stall_s"] < record["ckpt_write_s"] else ""))
    return (
        f"{head} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f}"
        f" | {record['step_time_s'] * 1000:.0f} ms | {record['tokens_per_s']:,.0f} tok/s"
        f" | MFU {record['mfu'] * 100:.2f}% | mem {record['mem_max_mb']:,.0f} MB max/rank"
        f" | samples {record['consumed_samples']}"
    )


class WandbSink:
    """A Weights & Biases run getting every record: train/*, val/*, checkpoint/* keyed by the
    trainer's step (its own x-axis, so a restart that repeats steps after the last checkpoint is
    logged rather than dropped as non-monotonic). Its id lives in <run_dir>/wandb-run-id, so a
    resumed run continues the same W&B run."""

    ID_FILE = "wandb-run-id"

    def __init__(self, cfg: LoggingConfig, run_dir: str, run_config: dict):
        import wandb

        id_file = Path(run_dir) / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)  # W&B: [a-z0-9]+
        if not id_file.exists():
            tmp = id_file.with_name(id_file.name + ".tmp")
            tmp.write_text(run_id + "\n")
            tmp.replace(id_file)
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                              name=cfg.wandb_name or Path(run_dir).resolve().name, tags=list(cfg.wandb_tags),
                              mode=cfg.wandb_mode, id=run_id, resume="allow", dir=run_dir, config=run_config)
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")

    def write(self, record: dict) -> None:
        prefix = {"eval": "val", "checkpoint": "checkpoint"}.get(record["kind"], "train")
        data = {f"{prefix}/{key}": value for key, value in record.items()
                if key not in ("kind", "step", "time") and isinstance(value, (int, float))}
        self.run.log({"trainer/step": record["step"], **data})

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Sinks of rank 0: console, JSONL, TensorBoard, W&B. On other ranks every sink is None and
    the writer stays silent, so callers need no rank checks."""

    def __init__(self, total_steps: int, console: bool, jsonl_file=None, tensorboard=None, wandb=None):
        self.total_steps = total_steps
        self.console = console
        self.jsonl_file = jsonl_file
        self.tensorboard = tensorboard
        self.wandb = wandb

    def note(self, text: str) -> None:
        if self.console:
            print(f"[gridtrain] {text}", flush=True)

    def write(self, record: dict) -> None:
        if self.console:
            print(format_record(record, self.total_steps), flush=True)
        if self.jsonl_file is not None:
            # One write per line, flushed: a crash can lose at most the line being written.
            self.jsonl_file.write(json.dumps(record) + "\n")
            self.jsonl_file.flush()
        if self.tensorboard is not None:
            self._write_tensorboard(record)
        if self.wandb is not None:
            self.wandb.write(record)

    def _write_tensorboard(self, record: dict) -> None:
        prefix = {"eval": "val", "checkpoint": "checkpoint"}.get(record["kind"], "train")
        for key, value in record.items():
            if key in ("kind", "step", "time") or not isinstance(value, (int, float)):
                continue
            self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])
        if record["kind"] == "train":
            for rank, used in enumerate(record["mem_bytes_per_rank"]):
                self.tensorboard.add_scalar(f"memory_mb/rank{rank}", used / 2**20, record["step"])
        self.tensorboard.flush()

    def close(self) -> None:
        if self.jsonl_file is not None:
            self.jsonl_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close()


def build_metrics_writer(cfg: LoggingConfig, run_dir: str, is_main: bool, total_steps: int,
                         run_config: dict | None = None) -> MetricsWriter:
    """Open the sinks LoggingConfig asks for, on rank 0 only. The JSONL file is appended to, so a
    resumed run continues the same file; `run_config` (the resolved config) is W&B's run config."""
    if not is_main:
        return MetricsWriter(total_steps, console=False)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    jsonl_file = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") if cfg.jsonl else None
    tensorboard = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
    wandb = WandbSink(cfg, run_dir, run_config or {}) if cfg.wandb_project else None
    return MetricsWriter(total_steps, console=True, jsonl_file=jsonl_file, tensorboard=tensorboard, wandb=wandb)
