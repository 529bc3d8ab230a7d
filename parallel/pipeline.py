"""DeepSpeed PipelineModule over the model's layer factories (the PP > 1 path).

Parameter names come out as in the PP=1 Decoder ("<layer index>.<param>", tied ones under
"tied_modules.<key>."), because both walk the same factory list.
"""
import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from gridtrain.model.config import ModelConfig
from gridtrain.model.decoder import LayerFactory, build_layer_factories
from gridtrain.model.loss import lm_loss
from gridtrain.parallel.deepspeed_compat import pipeline_module
from gridtrain.parallel.memory_estimate import layer_parameters_per_tp_rank


class FactorySpec(LayerSpec):
    """A LayerSpec that builds through a gridtrain LayerFactory (which seeds its own weights)
    instead of calling a module class: DeepSpeed only needs `typename` for its checks and repr."""

    def __init__(self, factory: LayerFactory):
        super().__init__(nn.Module)
        self.factory = factory

    def build(self, log: bool = False) -> nn.Module:
        return self.factory.build()

    def __repr__(self) -> str:
        return f"LayerFactory({self.factory.name})"


class TiedFactorySpec(TiedLayerSpec):
    """The TiedLayerSpec counterpart: first and last stage each build the module, DeepSpeed
    broadcasts the tied weight from the first and all-reduces its gradient between the two."""

    def __init__(self, factory: LayerFactory):
        super().__init__(factory.tie_key, nn.Module, forward_fn=factory.forward_fn,
                         tied_weight_attr=[factory.tied_weight_attr])
        self.factory = factory

    def build(self, log: bool = False) -> nn.Module:
        return self.factory.build()

    def __repr__(self) -> str:
        return f"TiedLayerFactory({self.factory.name}, key={self.key})"


def pipeline_loss(logits: torch.Tensor, labels: tuple) -> torch.Tensor:
    """DeepSpeed calls loss_fn(outputs, labels); labels is the micro-batch's (labels, loss_mask),
    and its loss_normalizer for fine-tuning data."""
    return lm_loss(logits, *labels)


def layer_specs(model: ModelConfig, tp: int, seed: int, segment_mask: bool) -> list[LayerSpec]:
    factories = build_layer_factories(model, tp, seed, segment_mask)
    return [TiedFactorySpec(f) if f.tie_key else FactorySpec(f) for f in factories]


def build_pipeline_module(ctx, model: ModelConfig, seed: int, segment_mask: bool) -> PipelineModule:
    """This stage's slice of the decoder. Micro-batch format for PipelineEngine:
    ((tokens, position_ids, segment_ids), (labels, loss_mask)), all (B, T). partition_method
    "parameters" balances the analytic per-layer counts (gridtrain.parallel.memory_estimate), so no
    rank builds a layer it does not own."""
    return pipeline_module(
        layer_counts=layer_parameters_per_tp_rank(model, ctx.tp),
        layers=layer_specs(model, ctx.tp, seed, segment_mask),
        topology=ctx.topology,
        loss_fn=pipeline_loss,
        partition_method=ctx.layout.pipeline_partition,
        # Blocks checkpoint themselves (model.activation_checkpointing); DeepSpeed's interval
        # checkpointing would recompute them a second time.
        activation_checkpoint_interval=0,
    )


def pipeline_batch(batch: dict, device: torch.device) -> tuple:
    """A loader micro-batch (dict) in PipelineEngine's input format."""
    inputs = tuple(batch[k].to(device) for k in ("tokens", "position_ids", "segment_ids"))
    targets = tuple(batch[k].to(device) for k in ("labels", "loss_mask", "loss_normalizer") if k in batch)
    return inputs, targets
