"""Weights from full tensors instead of random initialisation (`train.init_from`, generation).

gridtrain builds every TP layer from its full weight and keeps this rank's slice (megatron-core's
CPU initialisation), so loading a model means replacing the full weight's source: each parameter
of this rank's module (a Decoder, or a pipeline stage: names per gridtrain.model.naming) takes
its slice of the source's full tensor along megatron-core's partition_dim. Vocab rows beyond the
source's vocabulary (a larger model vocab, Megatron's padding) keep what the module had (its own
initialisation, zero padding). Run before deepspeed.initialize, which partitions ZeRO-3 weights.
"""
import torch

from gridtrain.errors import UserError
from gridtrain.model.naming import is_vocab_parameter


def _rank_slice(full: torch.Tensor, param: torch.nn.Parameter, tp: int, tp_rank: int) -> torch.Tensor:
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(tp, dim=getattr(param, "partition_dim", 0))[tp_rank]


def assign_full_weights(module: torch.nn.Module, source, num_layers: int, tp: int, tp_rank: int) -> int:
    """Copy every parameter of `module` from `source` (full, unpadded tensors by name); returns
    the count. UserError if the source lacks a parameter or its shape differs."""
    count = 0
    with torch.no_grad():
        for name, param in module.named_parameters():
            full = source.tensor(name)
            if is_vocab_parameter(name, num_layers):
                _assign_vocab_rows(name, param, full, tp, tp_rank)
            else:
                piece = _rank_slice(full, param, tp, tp_rank)
                if piece.shape != param.shape:
                    raise UserError(f"train.init_from: {name} has shape {tuple(full.shape)} there, the model "
                                    f"needs {tuple(param.shape)} per TP rank of {tp}; the model section must match it")
                param.copy_(piece)
            count += 1
    return count


def _assign_vocab_rows(name: str, param: torch.nn.Parameter, full: torch.Tensor, tp: int, tp_rank: int) -> None:
    """Rows [start, start + local) of the padded vocab live on this rank; the source has the
    first full.shape[0] of them."""
    local = param.shape[0]
    start = tp_rank * local if tp > 1 else 0
    if full.shape[1:] != param.shape[1:]:
        raise UserError(f"train.init_from: {name} has shape {tuple(full.shape)} there; the model's rows are "
                        f"{tuple(param.shape[1:])} wide")
    rows = max(0, min(local, full.shape[0] - start))
    if rows:
        param[:rows].copy_(full[start:start + rows])
