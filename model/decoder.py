"""The decoder as an ordered list of layer factories (what a pipeline stage builds a slice of) and
as one nn.Module (the PP=1 path). Both build identical weights from (seed, layer index)."""
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

from gridtrain.model.block import Activations, Block
from gridtrain.model.config import ModelConfig
from gridtrain.model.embedding import Embedding
from gridtrain.model.head import LMHead, tied_head_forward
from gridtrain.model.init import layer_rng
from gridtrain.model.naming import EMBEDDING, EMBEDDING_VOCAB_KEY, TIE_KEY, block_index, final_norm_index, head_index
from gridtrain.model.norms import build_norm
from gridtrain.model.tp_config import build_parallel_config


@dataclass(frozen=True)
class LayerFactory:
    """One entry of the layer list; maps 1:1 onto DeepSpeed's LayerSpec / TiedLayerSpec.

    build() returns the module (seeded, so any stage builds the same weights). Entries sharing a
    tie_key share one module: the first builds it, later ones call forward_fn(module, inputs)
    (or module(inputs) when forward_fn is None); tied_weight_attr names the shared parameter."""

    name: str
    build: Callable[[], nn.Module]
    tie_key: Optional[str] = None
    forward_fn: Optional[Callable] = None
    tied_weight_attr: Optional[str] = None


class FinalNorm(nn.Module):
    """(hidden, position_ids, segment_ids) -> the same with hidden normalised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = build_norm(cfg)

    def forward(self, inputs: Activations) -> Activations:
        hidden, position_ids, segment_ids = inputs
        return self.norm(hidden), position_ids, segment_ids


def _seeded(seed: int, index: int, make: Callable[[], nn.Module]) -> nn.Module:
    with layer_rng(seed, index):
        return make()


def build_layer_factories(cfg: ModelConfig, tp_size: int, seed: int, segment_mask: bool = False) -> list[LayerFactory]:
    """[embedding, block_0 .. block_{L-1}, final_norm, head], at the indices gridtrain.model.naming
    defines. Factory i seeds its weights from (seed, i); the tied gpt2 head reuses the embedding's
    build (same module, same seed). Building the TP layers needs megatron.core.parallel_state
    initialised (gridtrain.parallel)."""
    mp = build_parallel_config(tp_size)
    layers = cfg.num_layers
    embed_build = partial(_seeded, seed, EMBEDDING, partial(Embedding, cfg, mp, tp_size))
    tie = dict(tie_key=TIE_KEY, tied_weight_attr=EMBEDDING_VOCAB_KEY) if cfg.tied else {}
    factories = [LayerFactory("embedding", embed_build, **tie)]
    for i in range(layers):
        build_block = partial(Block, cfg, mp, segment_mask)
        factories.append(LayerFactory(f"block_{i}", partial(_seeded, seed, block_index(i), build_block)))
    factories.append(LayerFactory("final_norm", partial(_seeded, seed, final_norm_index(layers), partial(FinalNorm, cfg))))
    if cfg.tied:
        factories.append(LayerFactory("head", embed_build, forward_fn=tied_head_forward, **tie))
    else:
        build_head = partial(LMHead, cfg, mp, tp_size)
        factories.append(LayerFactory("head", partial(_seeded, seed, head_index(layers), build_head)))
    return factories


class Decoder(nn.Module):
    """The whole decoder on one pipeline stage. Parameter names match DeepSpeed's PipelineModule
    over the same factories (gridtrain.model.naming): "<layer index>.<key>", and
    "tied_modules.embed.<key>" for a tied embedding."""

    def __init__(self, cfg: ModelConfig, tp_size: int, seed: int, segment_mask: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tp_size = tp_size
        self.tied_modules = nn.ModuleDict()
        self._forward_funcs: list[Callable] = []
        for index, factory in enumerate(build_layer_factories(cfg, tp_size, seed, segment_mask)):
            if factory.tie_key is None:
                module = factory.build()
                self.add_module(str(index), module)
                self._forward_funcs.append(module)
                continue
            if factory.tie_key not in self.tied_modules:
                self.tied_modules[factory.tie_key] = factory.build()
            module = self.tied_modules[factory.tie_key]
            self._forward_funcs.append(partial(factory.forward_fn, module) if factory.forward_fn else module)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """tokens, position_ids, segment_ids (B, T) int64 -> logits (B, T, padded_vocab / tp)."""
        x = (tokens, position_ids, segment_ids)
        for layer in self._forward_funcs:
            x = layer(x)
        return x

    def forward_cached(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """Inference over the tokens (B, T) that follow the cache.length already in `cache`
        (gridtrain.model.generation.KVCache), which is then advanced -> logits (B, T, padded_vocab).
        Inference at TP = 1 only (blocks skip megatron-core's TP wrappers)."""
        if self.tp_size != 1:
            raise ValueError(f"cached inference runs at tensor_parallel 1, not {self.tp_size}")
        cache.begin(tokens.shape[1])
        x, block = (tokens, position_ids, torch.zeros_like(tokens)), 0
        for layer in self._forward_funcs:
            if isinstance(layer, Block):
                x = (layer.forward_cached(x[0], x[1], cache, block), x[1], x[2])
                block += 1
            else:
                x = layer(x)
        cache.advance(tokens.shape[1])
        return x
