"""The full, layout-free weights of a training run, gathered from TP / PP / ZeRO-3 shards.

Names are the PP=1 Decoder's (gridtrain.model.naming), tensors
are the full unsharded fp32 weights with Megatron's vocab padding removed (the padding depends on
TP), so the result is the same for the same model whatever layout trained it.
"""
import contextlib

import torch
import torch.distributed as dist

from gridtrain.model.naming import is_vocab_parameter


def zero3_gathered(module: torch.nn.Module):
    """Context in which ZeRO-3 partitioned parameters hold their full (TP-local) data; a no-op for
    other stages. Collective over the DP group."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def tp_full(param: torch.Tensor, ctx) -> torch.Tensor:
    """The whole tensor of a TP-split parameter (concatenated along megatron's partition_dim), or
    the parameter itself if TP replicates it. Collective over the TP group."""
    data = param.detach().float().cpu()
    if ctx.tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return data.clone()
    if getattr(param, "partition_stride", 1) != 1:
        raise NotImplementedError("strided TP partitions (fused layers) are not gathered; the model uses none")
    shards = [torch.empty_like(data) for _ in range(ctx.tp)]
    dist.all_gather(shards, data, group=ctx.mpu.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=param.partition_dim)


def strip_vocab_padding(name: str, tensor: torch.Tensor, vocab_size: int, num_layers: int) -> torch.Tensor:
    if is_vocab_parameter(name, num_layers):
        return tensor[:vocab_size].clone()
    return tensor


def stage_state_dict(module: torch.nn.Module, ctx, vocab_size: int, num_layers: int) -> dict:
    """This pipeline stage's parameters, full over TP and ZeRO-3. Collective over TP and DP."""
    out = {}
    with zero3_gathered(module):
        for name, param in module.named_parameters():
            out[name] = strip_vocab_padding(name, tp_full(param, ctx), vocab_size, num_layers)
    return out


def full_state_dict(engine, ctx, model) -> dict:
    """name -> full fp32 tensor on world rank 0 ({} elsewhere) for a TrainEngine. Collective:
    every rank calls it. The pipeline stages send their parts to rank 0 (stage 0 of the first
    pipeline); for tied parameters the first stage's copy wins (DeepSpeed keeps them equal)."""
    local = stage_state_dict(engine.module, ctx, model.vocab_size, model.num_layers)
    if ctx.pp == 1:
        return local if ctx.rank == 0 else {}
    if ctx.tp_rank != 0 or ctx.dp_rank != 0:
        return {}
    parts = [None] * ctx.pp if ctx.rank == 0 else None
    dist.gather_object(local, parts, dst=0, group=ctx.mpu.get_pipeline_model_parallel_group())
    if ctx.rank != 0:
        return {}
    merged = {}
    for part in parts:
        for name, tensor in part.items():
            merged.setdefault(name, tensor)
    return merged
