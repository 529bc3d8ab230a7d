"""Output layer: logits over the vocab, split across TP ranks, Megatron's padding hidden."""
import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.utils import get_pg_rank
from torch import nn

from gridtrain.model.config import ModelConfig
from gridtrain.model.embedding import Activations, Embedding
from gridtrain.model.init import padded_vocab_init


def mask_padded_logits(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Fill the logits of padding ids (global id >= vocab_size) with the dtype's minimum, so softmax
    gives them probability 0 and they get no gradient. logits (B, T, V_local) hold global ids
    [vocab_start, vocab_start + V_local)."""
    local = logits.shape[-1]
    if vocab_start + local <= vocab_size:
        return logits  # this TP rank holds no padding
    ids = torch.arange(vocab_start, vocab_start + local, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, torch.finfo(logits.dtype).min)


class LMHead(nn.Module):
    """Untied head (llama): (hidden, position_ids, segment_ids) -> logits (B, T, padded_vocab / tp).
    ColumnParallelLinear with gather_output=False: the vocab stays split for the parallel loss."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_size: int):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.proj = ColumnParallelLinear(
            cfg.hidden_size, cfg.padded_vocab_size(tp_size), config=mp_config,
            init_method=padded_vocab_init(cfg.init_std, cfg.vocab_size), bias=False, gather_output=False,
        )
        self.vocab_start = get_pg_rank(self.proj.tp_group) * self.proj.output_size_per_partition

    def forward(self, inputs: Activations) -> torch.Tensor:
        logits = self.proj(inputs[0])[0]
        return mask_padded_logits(logits, self.vocab_start, self.vocab_size)


def tied_head_forward(embedding: Embedding, inputs: Activations) -> torch.Tensor:
    """Tied head (gpt2): logits = hidden @ word_embeddingᵀ on this rank's vocab slice,
    (B, T, padded_vocab / tp). DeepSpeed TiedLayerSpec's forward_fn(module, inputs)."""
    word = embedding.word
    logits = word(inputs[0], as_logits=True)
    return mask_padded_logits(logits, word.vocab_start_index, embedding.vocab_size)
