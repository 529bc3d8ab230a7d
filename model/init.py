"""Weight initialisation that does not depend on the parallel layout.

DeepSpeed's PipelineModule builds only the local stage's layers and megatron-core's CPU
initialisation draws each full weight from the global RNG, so every layer is built under its own
RNG stream seeded from (seed, global layer index): the same full weights at any TP and PP."""
import contextlib
from typing import Callable

import numpy as np
import torch

InitMethod = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def layer_rng(seed: int, layer_index: int):
    """Run the body with torch's CPU RNG seeded from (seed, layer_index); restore it after."""
    # SeedSequence mixes both numbers, so nearby (seed, index) pairs give unrelated streams.
    layer_seed = int(np.random.SeedSequence([seed, layer_index]).generate_state(1, np.uint64)[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed)
        yield


def normal_init(std: float) -> InitMethod:
    return lambda weight: torch.nn.init.normal_(weight, mean=0.0, std=std)


def padded_vocab_init(std: float, vocab_size: int) -> InitMethod:
    """normal(0, std) for the real vocab rows, zero for Megatron's padding rows. Only the real rows
    draw from the RNG, so they are the same whatever padding TP implies."""

    def init(weight: torch.Tensor) -> torch.Tensor:  # (padded_vocab, h)
        with torch.no_grad():
            torch.nn.init.normal_(weight[:vocab_size], mean=0.0, std=std)
            weight[vocab_size:].zero_()
        return weight

    return init
