"""MFU on CPU: model FLOP/s of gridtrain's engine training a llama (hidden 512) on 1 rank, over this
machine's fp32 matmul peak measured in the same process with the same thread count. Also breaks one
step into GEMMs, attention, other ops, optimizer and engine overhead to show what limits it.

The machine is shared (other jobs, other engineers' tests), so the headline counts a step's process
CPU time, not its wall time, like the peak probe does (gridtrain.train.metrics): neighbours' time
slices then cancel out. The wall-clock figures are printed too; on an idle machine they agree.

Run: `make bench` or `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_engine_mfu.py`."""
import sys
import time

import torch
from single_rank import single_rank_env, start_engine

HIDDEN, LAYERS, HEADS, VOCAB, SEQ, MICRO = 512, 4, 8, 8192, 256, 4
WARMUP_STEPS, TIMED_STEPS = 2, 5
PEAK_SIZES = (1024, 2048, 4096)
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"}
ATTENTION_MARK = "scaled_dot_product"


def run_config():
    from gridtrain.data.config import DataConfig
    from gridtrain.model.config import ModelConfig
    from gridtrain.parallel.config import OptimConfig
    from gridtrain.train.config import TrainConfig
    from gridtrain.train.run_config import RunConfig

    model = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS,
                        num_attention_heads=HEADS, max_seq_len=SEQ)
    train = TrainConfig(steps=WARMUP_STEPS + TIMED_STEPS, global_batch_size=MICRO, micro_batch_size=MICRO,
                        run_dir="/tmp/gridtrain-bench-mfu")
    return RunConfig(model=model, data=DataConfig(seq_length=SEQ), optim=OptimConfig(warmup_steps=0), train=train)


def synthetic_batches(seed: int = 0):
    """Endless micro-batches of random tokens in the loader's format (one document per sample)."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.arange(SEQ).expand(MICRO, SEQ).contiguous()
    sample = 0
    while True:
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)
        yield {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
               "position_ids": positions, "segment_ids": torch.zeros(MICRO, SEQ, dtype=torch.int64),
               "loss_mask": torch.ones(MICRO, SEQ), "sample_ids": torch.arange(sample, sample + MICRO)}
        sample += MICRO


def time_train_steps(engine, batches) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds (all threads, divided by the thread count, as the peak
    probe counts them) of each timed engine.train_step, after warm-up. The CPU time is what the
    step costs whatever the neighbours on this shared machine do; on an idle machine both agree."""
    for _ in range(WARMUP_STEPS):
        engine.train_step(batches)
    wall, cpu = [], []
    for _ in range(TIMED_STEPS):
        start, start_cpu = time.perf_counter(), time.process_time()
        engine.train_step(batches)
        wall.append(time.perf_counter() - start)
        cpu.append((time.process_time() - start_cpu) / torch.get_num_threads())
    return wall, cpu


def phase_times(engine, batches, repeats: int = 3) -> dict:
    """One step split by DeepSpeed's own API (forward + loss, backward, optimizer step; process CPU
    seconds, least of `repeats`) and, in the fastest of two profiled forward + backward passes, the self time of GEMM and attention kernels
    and of all ops together (the rest of the wall time is Python, autograd and DeepSpeed hooks)."""
    from gridtrain.model.loss import lm_loss

    ds = engine.ds_engine
    batch = next(batches)
    samples = {"forward": [], "backward": [], "optimizer": []}
    threads = torch.get_num_threads()
    for _ in range(repeats):
        start = time.process_time()
        loss = lm_loss(ds(batch["tokens"], batch["position_ids"], batch["segment_ids"]), batch["labels"], batch["loss_mask"])
        samples["forward"].append((time.process_time() - start) / threads)
        start = time.process_time()
        ds.backward(loss)
        samples["backward"].append((time.process_time() - start) / threads)
        start = time.process_time()
        ds.step()
        samples["optimizer"].append((time.process_time() - start) / threads)
    phases = {name: min(values) for name, values in samples.items()}
    events = min((profile_forward_backward(ds, batch) for _ in range(2)),
                 key=lambda evs: sum(e.self_cpu_time_total for e in evs))
    phases["gemm"] = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
    phases["attention"] = sum(e.self_cpu_time_total for e in events if ATTENTION_MARK in e.key) / 1e6
    phases["ops"] = sum(e.self_cpu_time_total for e in events) / 1e6
    top = sorted((e for e in events if e.key not in GEMM_OPS and ATTENTION_MARK not in e.key),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:4]
    phases["top_other"] = [(e.key, e.self_cpu_time_total / 1e6) for e in top]
    return phases


def profile_forward_backward(ds, batch):
    from gridtrain.model.loss import lm_loss

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss = lm_loss(ds(batch["tokens"], batch["position_ids"], batch["segment_ids"]), batch["labels"], batch["loss_mask"])
        ds.backward(loss)
    ds.step()  # close the step DeepSpeed opened, so the engine is left consistent
    return prof.key_averages()


def gemm_flops_per_step(cfg) -> float:
    """FLOPs of the weight GEMMs alone (forward + backward), i.e. the model count minus attention."""
    from gridtrain.model.flops import training_flops_per_token

    attention = 12.0 * cfg.model.num_layers * cfg.model.hidden_size * SEQ
    return (training_flops_per_token(cfg.model, SEQ) - attention) * MICRO * SEQ


def throughput_rows(per_token: float, peak: dict, step_times: tuple[list[float], list[float]]) -> list:
    from gridtrain.train.metrics import mfu

    best_peak, tokens = max(peak.values()), MICRO * SEQ
    wall, cpu = step_times
    best, median, cpu_s = min(wall), sorted(wall)[len(wall) // 2], min(cpu)
    rows = [(f"fp32 matmul peak {n}x{n} ({torch.get_num_threads()} thread(s))", f"{f / 1e9:.1f} GFLOP/s", "")
            for n, f in peak.items()]
    rows.append((f"llama h={HIDDEN} L={LAYERS} vocab={VOCAB} seq={SEQ} batch={MICRO}",
                 f"{per_token / 1e6:.1f} MFLOP/tok", "training FLOPs per token"))
    for name, seconds, unit in (("median wall", median, "tok/s"), ("process CPU time / threads", cpu_s, "tok/CPU-s"),
                                ("best wall", best, "tok/s")):
        rows.append((f"engine.train_step, {name}", f"{seconds * 1e3:.0f} ms",
                     f"{tokens / seconds:,.0f} {unit}, MFU {mfu(per_token, tokens / seconds, best_peak):.3f}"))
    rows.append(("model FLOP/s per CPU-second", f"{per_token * tokens / cpu_s / 1e9:.1f} GFLOP/s",
                 f"CPU share of the best wall step {min(cpu) / best:.0%}"))
    return rows


def breakdown_rows(cfg, best_peak: float, step_cpu: float, phases: dict) -> list:
    rows = [(f"  phase {name} (CPU)", f"{phases[name] * 1e3:.0f} ms", f"{phases[name] / step_cpu:.1%} of step CPU time")
            for name in ("forward", "backward", "optimizer")]
    fwd_bwd = phases["forward"] + phases["backward"]
    gemm_rate = gemm_flops_per_step(cfg) / phases["gemm"]
    attention_rate = 12.0 * LAYERS * HIDDEN * SEQ * MICRO * SEQ / phases["attention"]
    other = phases["ops"] - phases["gemm"] - phases["attention"]
    rows += [("  fwd+bwd: weight GEMM kernels", f"{phases['gemm'] * 1e3:.0f} ms",
              f"{gemm_rate / 1e9:.1f} GFLOP/s = {gemm_rate / best_peak:.1%} of peak"),
             ("  fwd+bwd: attention kernels (SDPA)", f"{phases['attention'] * 1e3:.0f} ms",
              f"{attention_rate / 1e9:.1f} GFLOP/s = {attention_rate / best_peak:.1%} of peak"),
             ("  fwd+bwd: all other ops", f"{other * 1e3:.0f} ms", "top: " +
              ", ".join(f"{k.replace('aten::', '')} {v * 1e3:.0f}" for k, v in phases["top_other"])),
             ("  fwd+bwd: Python/autograd/DeepSpeed hooks", f"{(fwd_bwd - phases['ops']) * 1e3:.0f} ms",
              "fwd+bwd CPU - profiled op self time"),
             ("  TrainEngine wrapper", f"{(step_cpu - fwd_bwd - phases['optimizer']) * 1e3:.0f} ms",
              "step CPU - sum of phases")]
    return rows


def report(cfg, peak: dict, step_times: tuple[list[float], list[float]], phases: dict) -> None:
    from gridtrain.model.flops import training_flops_per_token
    from gridtrain.train.metrics import mfu

    per_token = training_flops_per_token(cfg.model, SEQ)
    best_peak, step_cpu = max(peak.values()), min(step_times[1])
    rows = throughput_rows(per_token, peak, step_times) + breakdown_rows(cfg, best_peak, step_cpu, phases)
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  {note}")
    # Headline on CPU time: on this shared 2-core machine wall time mostly measures the neighbours.
    ratio = mfu(per_token, MICRO * SEQ / step_cpu, best_peak)
    print(f"MFU (model FLOPs per CPU-second of a step / measured fp32 matmul peak): {ratio:.3f}")


def main() -> int:
    single_rank_env()
    from gridtrain.parallel.groups import destroy
    from gridtrain.train.metrics import measure_matmul_flops

    cfg = run_config()
    ctx, engine = start_engine(cfg)
    batches = synthetic_batches()
    peak = {n: measure_matmul_flops(ctx.device, size=n, seconds=1.0) for n in PEAK_SIZES}
    step_times = time_train_steps(engine, batches)
    # Probe again after the steps: a neighbour's burst during either probe must not lower the peak.
    peak = {n: max(f, measure_matmul_flops(ctx.device, size=n, seconds=1.0)) for n, f in peak.items()}
    phases = phase_times(engine, batches)
    report(cfg, peak, step_times, phases)
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
