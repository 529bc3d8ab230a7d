"""TrainEngine: one optimizer step over the global batch, through DeepSpeed.

PP=1: the Decoder in a DeepSpeedEngine (ZeRO 0-3): forward, engine.backward, engine.step per
micro-batch; DeepSpeed accumulates and steps at the last one. PP>1: a PipelineModule in
DeepSpeed's PipelineEngine (1F1B schedule, ZeRO <= 1), which runs the whole step in train_batch.
Both report the loss as the mean over the global batch (mean of micro-batch means, averaged over
DP; for fine-tuning data each micro-batch's masked sum is divided by its `loss_normalizer`, so that
mean is the mean over every answer token of the global batch), the same number on every rank, and
the global gradient norm before clipping.
"""
import itertools
from dataclasses import dataclass
from typing import Iterator

import deepspeed
import torch
import torch.distributed as dist

from gridtrain.model.config import ModelConfig
from gridtrain.model.decoder import Decoder
from gridtrain.model.loss import lm_loss
from gridtrain.parallel.config import OptimConfig
from gridtrain.parallel.ds_config import build_ds_config, deepspeed_clips
from gridtrain.parallel.full_weights import assign_full_weights
from gridtrain.parallel.grad_clip import install_clipping
from gridtrain.parallel.optim import build_optimizer
from gridtrain.parallel.pipeline import build_pipeline_module, pipeline_batch


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float


def take(micro_batches: Iterator[dict], count: int) -> list[dict]:
    """Exactly `count` micro-batches, or an error saying the data ran out."""
    batches = list(itertools.islice(micro_batches, count))
    if len(batches) != count:
        raise RuntimeError(f"the data iterator ended after {len(batches)} of {count} micro-batches of this step")
    return batches


class TrainEngine:
    """Built by build_engine. `ds_engine` is the DeepSpeed engine (checkpoint save/load use it),
    `module` the model it trains (Decoder, or this stage's PipelineModule)."""

    def __init__(self, ds_engine, ctx):
        self.ds_engine = ds_engine
        self.ctx = ctx
        self.grad_accum_steps = ctx.layout.grad_accum_steps
        self.pipelined = ctx.pp > 1

    @property
    def module(self) -> torch.nn.Module:
        return self.ds_engine.module

    def set_lr(self, lr: float) -> None:
        for group in self.ds_engine.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, micro_batches: Iterator[dict]) -> StepResult:
        """Consume grad_accum_steps of this rank's micro-batches and take one optimizer step."""
        batches = take(micro_batches, self.grad_accum_steps)
        if self.pipelined:
            data = iter([self._pipe_batch(b) for b in batches])
            loss = self.ds_engine.train_batch(data_iter=data).item()
        else:
            loss = self._train_local(batches)
        return StepResult(loss=loss, grad_norm=self._grad_norm())

    def _train_local(self, batches: list[dict]) -> float:
        self.ds_engine.train()
        total = torch.zeros((), device=self.ctx.device)
        for batch in batches:
            batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
            logits = self.ds_engine(batch["tokens"], batch["position_ids"], batch["segment_ids"])
            loss = lm_loss(logits, batch["labels"], batch["loss_mask"], batch.get("loss_normalizer"))
            self.ds_engine.backward(loss)
            self.ds_engine.step()
            total += loss.detach()
        return self._dp_mean(total / len(batches))

    def _grad_norm(self) -> float:
        norm = self.ds_engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def eval_loss(self, micro_batches: Iterator[dict], num_micro_batches: int) -> float:
        """Mean loss over num_micro_batches of this rank's micro-batches, averaged over DP; no
        gradients, no state change. Collective: every rank calls it."""
        batches = take(micro_batches, num_micro_batches)
        if self.pipelined:
            data = iter([self._pipe_batch(b) for b in batches])
            return self.ds_engine.eval_batch(data, num_micro_batches=num_micro_batches).item()
        return self._eval_local(batches)

    def _eval_local(self, batches: list[dict]) -> float:
        self.ds_engine.eval()
        total = torch.zeros((), device=self.ctx.device)
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
                logits = self.ds_engine(batch["tokens"], batch["position_ids"], batch["segment_ids"])
                total += lm_loss(logits, batch["labels"], batch["loss_mask"], batch.get("loss_normalizer"))
        self.ds_engine.train()
        return self._dp_mean(total / len(batches))

    def _pipe_batch(self, batch: dict) -> tuple:
        return pipeline_batch(batch, self.ctx.device)

    def _dp_mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        if self.ctx.dp > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.ctx.mpu.get_data_parallel_group())
            value /= self.ctx.dp
        return value.item()


def build_model(ctx, model: ModelConfig, seed: int, segment_mask: bool) -> torch.nn.Module:
    if ctx.pp > 1:
        return build_pipeline_module(ctx, model, seed, segment_mask)
    return Decoder(model, ctx.tp, seed, segment_mask=segment_mask)


def build_engine(ctx, model: ModelConfig, optim: OptimConfig, dtype: str = "fp32", seed: int = 1234,
                 segment_mask: bool = False, initial_weights=None) -> TrainEngine:
    """This rank's stage of `model` (weights seeded from `seed`, or taken from the full tensors of
    `initial_weights`, a gridtrain.convert.sources weight source; segment_mask: attention stays
    within documents) in DeepSpeed for ctx.layout: ZeRO stage, `dtype`, clipping, AdamW per
    `optim`. Collective: every rank of the world calls it with the same arguments."""
    ds_config = build_ds_config(ctx.layout, optim, dtype)
    module = build_model(ctx, model, seed, segment_mask)
    if initial_weights is not None:  # before deepspeed.initialize, which partitions ZeRO-3 weights
        assign_full_weights(module, initial_weights, model.num_layers, ctx.tp, ctx.tp_rank)
    optimizer = build_optimizer(module, optim)
    if not deepspeed_clips(ctx.layout.zero_stage, dtype):
        install_clipping(optimizer, optim.grad_clip, ctx.mpu)
    # A PipelineModule brings its own grid (the same groups, from ctx.topology) as mpu.
    mpu = None if ctx.pp > 1 else ctx.mpu
    ds_engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, mpu=mpu)
    return TrainEngine(ds_engine, ctx)
