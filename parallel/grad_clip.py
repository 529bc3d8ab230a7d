"""Global gradient-norm clipping for fp32 ZeRO-0, where DeepSpeed's own clipping is wrong.

DeepSpeed's fp32 ZeRO-0 path (engine.clip_fp32_gradients -> runtime.utils.clip_grad_norm_) counts a
replicated parameter only on model-parallel rank 0 of the TP x PP group, so under pipeline
parallelism the norms and biases of every stage but the first are left out, counts a tied
embedding (TP-split, so "model parallel") on both stages that hold it, and discards the norm it
computed (engine.get_global_grad_norm() stays None). Measured: gpt2 at PP=2 drifts from the
single-rank run by 4.6e-6 relative in the third step's loss. Here the norm counts each parameter once: TP-split weights on every TP rank,
TP-replicated ones on TP rank 0, pipeline-tied copies (ds_pipe_replicated) on their first stage
only; the squares are summed over the TP x PP group. DP ranks hold identical averaged gradients
at ZeRO-0, so no DP reduction is needed.
"""
import torch
import torch.distributed as dist

from gridtrain.parallel.deepspeed_compat import is_pipeline_tied_copy, record_global_grad_norm


def counted_in_norm(param: torch.nn.Parameter, tp_rank: int) -> bool:
    if is_pipeline_tied_copy(param):
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def global_grad_norm(params: list[torch.nn.Parameter], tp_rank: int, model_parallel_group) -> torch.Tensor:
    """L2 norm of the full model's gradient, identical on every rank. Collective over the group."""
    squares = [p.grad.detach().float().pow(2).sum() for p in params
               if p.grad is not None and counted_in_norm(p, tp_rank)]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=params[0].device)
    if dist.get_world_size(model_parallel_group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=model_parallel_group)
    return total.sqrt()


def install_clipping(optimizer: torch.optim.Optimizer, max_norm: float, mpu) -> None:
    """Before each optimizer.step(): compute the global norm, store it where DeepSpeed reads it
    (read by engine.get_global_grad_norm()) and scale the gradients by
    max_norm / (norm + 1e-6) when that is below 1 (DeepSpeed's formula, so layouts using
    DeepSpeed's ZeRO clipping agree with this one)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tp_rank = mpu.get_tensor_model_parallel_rank()
    group = mpu.get_model_parallel_group()

    def clip(opt, args, kwargs):
        norm = global_grad_norm(params, tp_rank, group)
        record_global_grad_norm(opt, norm.item())
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return None

    optimizer.register_step_pre_hook(clip)
