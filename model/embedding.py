"""Token embedding (vocab split across TP ranks) plus learned positions for gpt2."""
import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding, copy_to_tensor_model_parallel_region
from torch import nn

from gridtrain.model.config import ModelConfig
from gridtrain.model.init import normal_init, padded_vocab_init

Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class VocabEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding that can also project hidden states onto its weight (the tied gpt2
    head). The head then uses the weight inside a call of the module that owns it, which is when
    DeepSpeed ZeRO-3 gathers a partitioned parameter (in forward and again in backward)."""

    def forward(self, input_: torch.Tensor, as_logits: bool = False) -> torch.Tensor:
        if not as_logits:
            return super().forward(input_)  # tokens (B, T) -> (B, T, h), all-reduced over TP
        # hidden (B, T, h) is replicated over TP; copy_to_... all-reduces its gradient in backward,
        # as ColumnParallelLinear does. -> logits (B, T, padded_vocab / tp)
        hidden = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return F.linear(hidden, self.weight)


class Embedding(nn.Module):
    """(tokens, position_ids, segment_ids) -> (hidden (B, T, h), position_ids, segment_ids).

    word.weight is (padded_vocab / tp, h) on each TP rank; the padding rows are zero and never
    looked up. gpt2 adds position.weight (max_seq_len, h), replicated, indexed by position_ids so
    reset position ids work; llama gets its positions from RoPE inside attention."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_size: int):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.word = VocabEmbedding(
            cfg.padded_vocab_size(tp_size), cfg.hidden_size,
            init_method=padded_vocab_init(cfg.init_std, cfg.vocab_size), config=mp_config,
        )
        self.position = None
        if cfg.family == "gpt2":
            self.position = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
            normal_init(cfg.init_std)(self.position.weight.data)

    def forward(self, inputs: Activations) -> Activations:
        tokens, position_ids, segment_ids = inputs
        hidden = self.word(tokens)  # (B, T, h), all-reduced over TP
        if self.position is not None:
            hidden = hidden + self.position(position_ids)
        return hidden, position_ids, segment_ids
