"""The language-model loss over vocab-parallel logits."""
import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
            normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Masked mean cross entropy. logits (B, T, padded_vocab / tp) split over TP ranks, labels
    (B, T) int64 global ids, loss_mask (B, T) float. The same scalar on every TP rank. With
    `normalizer` ((B,) float, one value per micro-batch: fine-tuning's answer tokens of the global
    batch over its micro-batch count) the masked sum is divided by it instead of by the mask's sum.

    megatron-core's cross entropy works in fp32 and, like Megatron, overwrites fp32 `logits` in
    place (it saves a (B, T, V) copy): clone them first if you still need them. A micro-batch with
    an all-zero mask gives 0, not NaN."""
    losses = vocab_parallel_cross_entropy(logits, labels)  # (B, T) fp32
    mask = loss_mask.float()
    if normalizer is not None:
        return (losses * mask).sum() / normalizer.reshape(-1)[0]
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
