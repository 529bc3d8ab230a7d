"""Worker for test_equivalence.py: train the same tiny model on the same global batches under
several layouts of this world, and save per-step losses, grad norms, an eval loss and the full
weights of each run (rank 0) to OUT_DIR/<family>-<layout>-w<world size>.pt. The weights are those
of a checkpoint the run saves through gridtrain's Checkpointer, read back layout-free by
gridtrain.train.checkpoint.weights (what conversion reads).

Usage (under tests/multirank.launch): equivalence_worker.py OUT_DIR LAYOUT [LAYOUT ...]
LAYOUT is "tp<T>-pp<P>-z<Z>" (DP follows from the world size), or "perturbed" (the 1-rank run with
one token of one training sample changed: the negative control; ZeRO-0 in fp32, ZeRO-1 in bf16 like
the bf16 reference), either with "-bf16" appended for DeepSpeed's bf16 mixed precision.
"""
import gc
import os
import re
import sys
from pathlib import Path

import torch

from gridtrain.model.config import ModelConfig
from gridtrain.parallel import groups
from gridtrain.parallel.config import OptimConfig, ParallelConfig
from gridtrain.parallel.engine import build_engine
from gridtrain.parallel.layout import build_layout
from gridtrain.train.checkpoint.checkpointer import Checkpointer, RunRecord
from gridtrain.train.checkpoint.config import CheckpointConfig
from gridtrain.train.checkpoint.manifest import verify_checkpoint
from gridtrain.train.checkpoint.state import TrainState
from gridtrain.train.checkpoint.weights import read_weights

STEPS, GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB, LR = 3, 8, 2, 16, 300, 2e-3
FAMILIES = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=VOCAB, hidden_size=64, num_layers=2,
                        num_attention_heads=4, max_seq_len=SEQ),
    # GQA: 4 query heads share 2 KV heads; vocab 300 pads to 384 at TP=1 and 512 at TP=2.
    "llama": ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=64, num_layers=2,
                         num_attention_heads=4, num_kv_heads=2, max_seq_len=SEQ),
}


def global_batch(step: int, perturbed: bool) -> dict:
    """The step's global batch, identical for every layout: random tokens from a fixed seed and a
    loss mask with some zeros (so masked means are exercised)."""
    gen = torch.Generator().manual_seed(1000 + step)
    seqs = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    if perturbed and step == 0:
        seqs[3, 5] = (seqs[3, 5] + 1) % VOCAB
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=gen) > 0.1).float()
    return {
        "tokens": seqs[:, :-1], "labels": seqs[:, 1:], "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).clone(),
        "segment_ids": torch.zeros(GLOBAL_BATCH, SEQ, dtype=torch.long),
    }


def rank_micro_batches(batch: dict, dp_rank: int, dp: int):
    """Megatron's split: each chunk of MICRO_BATCH * dp consecutive samples gives DP rank r the
    samples [r * MICRO_BATCH, (r + 1) * MICRO_BATCH) of the chunk."""
    chunk = MICRO_BATCH * dp
    for start in range(0, GLOBAL_BATCH, chunk):
        lo = start + dp_rank * MICRO_BATCH
        yield {k: v[lo:lo + MICRO_BATCH] for k, v in batch.items()}


OPTIM = OptimConfig(lr=LR, weight_decay=0.1, grad_clip=0.5)
SEED = 7


def saved_weights(checkpointer: Checkpointer, engine, step: int, rank: int) -> dict:
    """Save a checkpoint of `step` (collective); on rank 0 its full weights read from the files."""
    result = checkpointer.save(engine, TrainState(step=step))
    if rank != 0:
        return {}
    assert verify_checkpoint(result.path) == [], result.path
    return read_weights(result.path)


def run_layout(family: str, name: str, out_dir: Path) -> None:
    perturbed = name.startswith("perturbed")
    dtype = "bf16" if name.endswith("-bf16") else "fp32"
    layout_name = name.removesuffix("-bf16")
    tp, pp, zero = (1, 1, 1 if dtype == "bf16" else 0) if perturbed else map(int, re.fullmatch(r"tp(\d)-pp(\d)-z(\d)", layout_name).groups())
    model = FAMILIES[family]
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, zero_stage=zero)
    layout = build_layout(parallel, MICRO_BATCH, GLOBAL_BATCH, int(os.environ["WORLD_SIZE"]))
    ctx = groups.initialize(parallel, layout)
    engine = build_engine(ctx, model, OPTIM, dtype=dtype, seed=SEED)
    losses, norms = [], []
    for step in range(STEPS):
        engine.set_lr(LR)
        result = engine.train_step(rank_micro_batches(global_batch(step, perturbed), ctx.dp_rank, ctx.dp))
        losses.append(result.loss)
        norms.append(result.grad_norm)
    eval_loss = engine.eval_loss(rank_micro_batches(global_batch(STEPS, False), ctx.dp_rank, ctx.dp),
                                 GLOBAL_BATCH // (MICRO_BATCH * ctx.dp))
    checkpointer = Checkpointer(CheckpointConfig(keep_last=0), layout,
                                RunRecord(ckpt_dir=out_dir / f"{family}-{name}-w{ctx.world_size}-ckpt", model=model,
                                          dtype=dtype))
    weights = saved_weights(checkpointer, engine, STEPS, ctx.rank)
    layout_checks = check_layout(model, ctx, engine)
    # set_lr reaches the optimizer DeepSpeed steps (ZeRO's flat fp32 partitions included): one more
    # step at lr 0 must leave every weight bit-identical (AdamW's decay is lr-scaled too).
    engine.set_lr(0.0)
    engine.train_step(rank_micro_batches(global_batch(STEPS + 1, False), ctx.dp_rank, ctx.dp))
    after = saved_weights(checkpointer, engine, STEPS + 1, ctx.rank)
    layout_checks["lr0_step_unchanged"] = all(torch.equal(after[n], weights[n]) for n in weights)
    # Every rank reports its loss: the contract says it is the same number everywhere.
    all_losses = [None] * ctx.world_size
    torch.distributed.all_gather_object(all_losses, losses)
    if ctx.rank == 0:
        record = {"losses": losses, "grad_norms": norms, "eval_loss": eval_loss, "weights": weights,
                  "rank_losses": all_losses, "grad_accum_steps": engine.grad_accum_steps, "dp": ctx.dp, "lr": LR, **layout_checks}
        torch.save(record, out_dir / f"{family}-{name}-w{ctx.world_size}.pt")
    del engine
    gc.collect()
    groups.destroy(world=False)


def check_layout(model: ModelConfig, ctx, engine) -> dict:
    """Facts about the layout for the test: every rank's (TP, PP, DP) coordinates; the analytic
    per-layer parameter counts the pipeline partitioning uses against the built layers; this
    stage's layer range; and the error a megatron/DeepSpeed group mismatch raises."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from gridtrain.model.decoder import build_layer_factories
    from gridtrain.parallel.memory_estimate import layer_parameters_per_tp_rank

    coords = [None] * ctx.world_size
    torch.distributed.all_gather_object(coords, (ctx.rank, ctx.tp, ctx.pp, ctx.dp, ctx.tp_rank, ctx.pp_rank, ctx.dp_rank))
    built = [sum(p.numel() for p in f.build().parameters()) for f in build_layer_factories(model, ctx.tp, SEED)]
    # A topology that disagrees with megatron's groups whenever TP or PP > 1: every axis moved to DP.
    wrong = PipeModelDataParallelTopology(num_pp=1, num_mp=1, num_dp=ctx.world_size)
    try:
        groups.check_topology_agreement(wrong, ctx.rank)
        mismatch_error = None
    except RuntimeError as exc:
        mismatch_error = str(exc)
    parts = getattr(engine.module, "parts", None)
    parts = None if parts is None else [int(p) for p in parts]  # DeepSpeed gives numpy ints
    return {"coords": coords, "analytic_layer_params": layer_parameters_per_tp_rank(model, ctx.tp),
            "built_layer_params": built, "mismatch_error": mismatch_error, "pipeline_parts": parts}


def main() -> None:
    out_dir, layouts = Path(sys.argv[1]), sys.argv[2:]
    for family in FAMILIES:
        for layout in layouts:
            run_layout(family, layout, out_dir)
    groups.destroy()


if __name__ == "__main__":
    main()
