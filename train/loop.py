"""The per-rank trainer. `run(cfg, layout)` is what every rank spawned by `gridtrain launch` calls;
it reads top to bottom: set up (seed, process groups, data, engine, resume) -> train() ->
train_step() / evaluate() each step -> summary -> tear down. `reshard(cfg, layout)` is the rank of
`gridtrain checkpoint reshard`: resume under the new layout, save. Only these two see the whole
run config; each component gets its own section and the Layout."""
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from gridtrain.data.config import is_finetune_blend
from gridtrain.data.datasets import build_datasets, default_cache_dir, run_samples
from gridtrain.data.finetune import FineTuneDataset
from gridtrain.data.loader import batches
from gridtrain.data.tokenizer import load_tokenizer
from gridtrain.errors import UserError
from gridtrain.model.flops import training_flops_per_token
from gridtrain.parallel import groups
from gridtrain.parallel.engine import TrainEngine, build_engine
from gridtrain.parallel.groups import ParallelContext
from gridtrain.parallel.heartbeat import Heartbeat, explain_timeout, is_collective_timeout
from gridtrain.parallel.layout import Layout
from gridtrain.train.checkpoint.checkpointer import Checkpointer, RunRecord, verify_together
from gridtrain.train.checkpoint.state import TrainState
from gridtrain.train.checkpoint.store import checkpoint_dir
from gridtrain.train.metrics import (
    MetricsWriter,
    build_metrics_writer,
    checkpoint_record,
    eval_record,
    gather_memory,
    perplexity,
    step_record,
    total_peak_flops,
)
from gridtrain.train.preemption import PREEMPTED_EXIT_CODE, StopRequest
from gridtrain.train.run_config import RunConfig
from gridtrain.train.schedule import lr_at

# Where train.init_from's weights come from: a function of (path, verify) returning a weight source
# (names(), shape(), tensor(), model, path), given by the command that starts the ranks
# (gridtrain.convert.sources.open_weights), which sits above this layer.
WeightOpener = Callable[..., object]


class TrainingDiverged(UserError):
    """The loss is NaN or infinite: continuing would only burn compute."""


@dataclass
class Trainer:
    """Everything one rank's loop needs, built once by build_trainer."""

    cfg: RunConfig
    ctx: ParallelContext
    engine: TrainEngine
    train_data: torch.utils.data.Dataset  # megatron-core's GPTDataset or BlendedDataset
    valid_data: Optional[torch.utils.data.Dataset]
    checkpointer: Checkpointer
    stop: StopRequest
    writer: MetricsWriter
    state: TrainState
    flops_per_token: float
    peak_flops_total: float


def run(cfg: RunConfig, layout: Layout, open_weights: Optional[WeightOpener] = None) -> int:
    """Train one rank to cfg.train.steps; returns 0 when done, or PREEMPTED_EXIT_CODE after a stop
    signal (SIGTERM/SIGUSR1 on any rank) made every rank save and stop at the same step. `layout`
    is validation's, for this world, whose rank variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) the
    caller has set; `open_weights` reads train.init_from (required when it is set)."""
    seed_everything(cfg.train.seed)
    ctx = groups.initialize(cfg.parallel, layout)
    heartbeat = Heartbeat(ctx.rank, layout.world_size).start()
    trainer = None
    try:
        with StopRequest() as stop:
            trainer = build_trainer(cfg, ctx, stop, open_weights)
            finished = train(trainer)
    except RuntimeError as exc:
        if is_collective_timeout(exc):  # a peer alive but stuck: name it rather than the timeout
            raise explain_timeout(heartbeat, cfg.parallel.timeout_minutes) from exc
        raise
    finally:
        heartbeat.stop()
        if trainer is not None:
            trainer.checkpointer.abandon()  # after a failure: no writer thread outlives the run
            trainer.checkpointer.deleter.wait()  # retired checkpoints are gone when the run ends
            trainer.writer.close()
        groups.destroy()
    return 0 if finished else PREEMPTED_EXIT_CODE


def reshard(cfg: RunConfig, layout: Layout) -> int:
    """One rank of `gridtrain checkpoint reshard`: build the engine of `layout`, resume
    cfg.train.resume into it (through DeepSpeed's universal form), save it natively into
    checkpoint.dir."""
    ctx = groups.initialize(cfg.parallel, layout)
    try:
        engine = build_engine_of(cfg, ctx)
        checkpointer = build_checkpointer(cfg, layout)
        state = checkpointer.resume(engine, cfg.train.resume)
        checkpointer.save(engine, state)
        checkpointer.deleter.wait()
    finally:
        groups.destroy()
    return 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch alike on every rank. Weights do not depend on it (each layer
    seeds its own initialisation) but anything else random (dropout, probes) then repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_record(cfg: RunConfig) -> dict:
    """The resolved run config as plain JSON values (for checkpoints and W&B)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def build_engine_of(cfg: RunConfig, ctx: ParallelContext, note=None, open_weights: Optional[WeightOpener] = None
                    ) -> TrainEngine:
    """The run's engine; with train.init_from, its weights come from there through `open_weights`
    (each rank reads its own slices; a checkpoint's files are verified by all ranks together first)."""
    initial = None
    if cfg.train.init_from:
        if open_weights is None:
            raise ValueError("train.init_from is set but no weight reader was given to the trainer")
        initial = open_weights(cfg.train.init_from, verify=verify_together)
        if note is not None:
            note(f"initial weights from {initial.path} (train.init_from)")
    # Packed fine-tuning samples hold several documents: attention stays within each.
    segment_mask = cfg.data.reset_attention_mask or is_finetune_blend(cfg.data.blend)
    return build_engine(ctx, cfg.model, cfg.optim, cfg.train.dtype, cfg.train.seed, segment_mask,
                        initial_weights=initial)


def build_checkpointer(cfg: RunConfig, layout: Layout) -> Checkpointer:
    record = RunRecord(ckpt_dir=checkpoint_dir(cfg.checkpoint, cfg.train.run_dir), model=cfg.model,
                       dtype=cfg.train.dtype, tokenizer=cfg.data.tokenizer,
                       config=config_record(cfg))
    checkpointer = Checkpointer(cfg.checkpoint, layout, record)
    checkpointer.check_shared()  # collective: a node-local checkpoint.dir fails here, not at the first save
    return checkpointer


def build_trainer(cfg: RunConfig, ctx: ParallelContext, stop: StopRequest,
                  open_weights: Optional[WeightOpener] = None) -> Trainer:
    writer = build_metrics_writer(cfg.logging, cfg.train.run_dir, ctx.rank == 0, cfg.train.steps, config_record(cfg))
    writer.note(f"rank layout: world {ctx.world_size} = TP {ctx.tp} x PP {ctx.pp} x DP {ctx.dp}, "
                f"ZeRO {ctx.layout.zero_stage}, {ctx.backend} on {ctx.device}")
    train_data, valid_data = build_data(cfg)
    if isinstance(train_data, FineTuneDataset):
        stats = train_data.stats
        writer.note(f"fine-tuning data: {len(train_data)} samples of {cfg.data.seq_length} tokens from "
                    f"{stats.documents} documents over {stats.epochs} epoch(s), "
                    f"{'packed' if cfg.data.pack else 'one per sample'}: {100 * stats.efficiency:.1f}% of "
                    f"positions hold tokens; {stats.truncated} cut to seq_length + 1 tokens, {stats.dropped} "
                    "left out (data.overlong)")
    if valid_data is None or cfg.train.eval_steps == 0:
        writer.note(f"validation off: data.split={cfg.data.split!r} gives it no documents or train.eval_steps=0")
    engine = build_engine_of(cfg, ctx, writer.note, open_weights)
    checkpointer = build_checkpointer(cfg, ctx.layout)
    state = checkpointer.resume(engine, cfg.train.resume) or TrainState(step=0, consumed_samples=0)
    if state.step:
        writer.note(f"resumed at step {state.step}, {state.consumed_samples} samples consumed")
    peak_total, peak_source = total_peak_flops(cfg.train.peak_flops, ctx.device)
    writer.note(f"peak FLOP/s for MFU: {peak_total:.3e} over {ctx.world_size} ranks, {peak_source}")
    return Trainer(
        cfg=cfg, ctx=ctx, engine=engine, train_data=train_data, valid_data=valid_data,
        checkpointer=checkpointer, stop=stop, writer=writer, state=state,
        flops_per_token=training_flops_per_token(cfg.model, cfg.data.seq_length),
        peak_flops_total=peak_total,
    )


def build_data(cfg: RunConfig) -> tuple:
    """Train and validation datasets sized by run_samples."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)  # validation made sure one is set
    if tokenizer.vocab_size > cfg.model.vocab_size:  # the launcher checked tokenizer.json's count alone
        raise UserError(f"model.vocab_size={cfg.model.vocab_size}: the tokenizer {cfg.data.tokenizer} has "
                        f"{tokenizer.vocab_size} tokens; set model.vocab_size to at least {tokenizer.vocab_size}")
    cache_dir = default_cache_dir(cfg.data, cfg.train.run_dir)
    samples = run_samples(cfg.train.steps, cfg.train.global_batch_size, cfg.train.eval_steps)
    train_data, valid_data, _ = build_datasets(cfg.data, samples, cache_dir, tokenizer)
    return train_data, valid_data


def micro_batches(t: Trainer, dataset, consumed_samples: int) -> Iterator[dict]:
    """This DP rank's micro-batches from the global sample `consumed_samples` on."""
    layout = t.ctx.layout
    return batches(dataset, consumed_samples, layout.micro_batch_size, t.ctx.dp_rank, layout.dp, t.cfg.data,
                   layout.global_batch_size)


def train(t: Trainer) -> bool:
    """The loop: one optimizer step per iteration, with logging, evaluation, checkpoints and stop
    requests between steps; ends with a final evaluation and a summary line. Returns False if it
    stopped early on a stop request (after saving), True when all steps are done."""
    cfg = t.cfg
    data = micro_batches(t, t.train_data, t.state.consumed_samples)
    records, started = [], time.perf_counter()
    # A run that checkpoints at all also keeps its final weights, whatever the interval.
    saves_on = cfg.checkpoint.interval_steps > 0 or cfg.checkpoint.interval_minutes > 0
    if cfg.train.eval_interval and t.state.step == 0:
        evaluate(t)  # the starting point every later validation loss is compared with
    while t.state.step < cfg.train.steps:
        record = train_step(t, data)
        if record is not None:
            records.append(record)
        step = t.state.step
        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.steps:
            evaluate(t)
        stopping = t.stop.should_stop()
        force = stopping or (step == cfg.train.steps and saves_on)
        record_saves(t, t.checkpointer.maybe_save(t.engine, t.state, force=force))
        if stopping:
            t.writer.note(f"stop requested by {t.stop.cause()}: saved step {step} and stopping")
            return False
    record_saves(t, t.checkpointer.close())  # a background save still in flight is published first
    val_loss = evaluate(t)
    t.writer.note(summary_line(t, records, val_loss, time.perf_counter() - started))
    return True


def record_saves(t: Trainer, published: list) -> None:
    for saved in published:
        t.writer.write(checkpoint_record(saved.step, saved.path, saved.bytes, saved.seconds, saved.stall,
                                         saved.published_at))


def train_step(t: Trainer, data: Iterator[dict]) -> Optional[dict]:
    """One optimizer step over the global batch (grad_accum_steps micro-batches of this rank);
    returns its metrics record on logging steps (collective: every rank computes it), else None."""
    cfg = t.cfg
    step = t.state.step + 1
    lr = lr_at(step, cfg.optim, cfg.train.steps)
    t.engine.set_lr(lr)
    start = time.perf_counter()
    result = t.engine.train_step(data)
    elapsed = time.perf_counter() - start
    if not math.isfinite(result.loss):
        # The loss is the global-batch mean, identical on every rank, so all ranks stop here together.
        raise TrainingDiverged(
            f"train: the loss became {result.loss} at step {step} (lr {lr:.3g}, grad norm {result.grad_norm:.3g}); "
            "lower optim.lr, lengthen optim.warmup_steps or tighten optim.grad_clip, then resume from the last checkpoint"
        )
    consumed = t.state.consumed_samples + cfg.train.global_batch_size
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    t.state = dataclasses.replace(t.state, step=step, consumed_samples=consumed, lr=lr,
                                  consumed_tokens=t.state.consumed_tokens + tokens)
    if step % cfg.logging.log_interval and step != cfg.train.steps:
        return None
    record = step_record(step, result.loss, result.grad_norm, lr, elapsed, tokens, t.flops_per_token,
                         t.peak_flops_total, gather_memory(t.ctx.device), consumed)
    if isinstance(t.train_data, FineTuneDataset):  # the tokens the step's loss is the mean over
        record["loss_tokens"] = t.train_data.loss_tokens(consumed - cfg.train.global_batch_size,
                                                         cfg.train.global_batch_size)
    t.writer.write(record)
    return record


def evaluate(t: Trainer) -> Optional[float]:
    """Validation loss over the fixed validation set (eval_steps global batches, so this rank's
    share is eval_steps * grad_accum_steps micro-batches), logged with its perplexity."""
    steps = t.cfg.train.eval_steps
    if t.valid_data is None or steps == 0:
        return None
    loss = t.engine.eval_loss(micro_batches(t, t.valid_data, 0), steps * t.engine.grad_accum_steps)
    t.writer.write(eval_record(t.state.step, loss))
    return loss


def summary_line(t: Trainer, records: list[dict], val_loss: Optional[float], seconds: float) -> str:
    """One line for the end of the run. Means skip the first logged step, which pays one-off
    warm-up costs, whenever there is more than one."""
    if not records:
        return f"done: step {t.state.step}, nothing trained in this run"
    steady = records[1:] or records
    tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    mfu = sum(r["mfu"] for r in steady) / len(steady)
    text = (f"done: {t.state.step} steps ({len(records)} logged) in {seconds:.1f} s | "
            f"loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}")
    if val_loss is not None:
        text += f" | val loss {val_loss:.4f} (ppl {perplexity(val_loss):.2f})"
    return text + (f" | {tokens_per_s:,.0f} tok/s | MFU {mfu * 100:.2f}% | "
                   f"mem {max(r['mem_max_mb'] for r in records):,.0f} MB max/rank")
