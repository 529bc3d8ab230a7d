"""The full, layout-free fp32 weights of a checkpoint, read from its files in one process, without
process groups: what conversion, generation, `train.init_from` and the layout-equivalence tests
read.

Each TP rank's slices come from DeepSpeed's files: at PP=1 with ZeRO 1-3, DeepSpeed's own
zero_to_fp32 merges the DP partitions of the fp32 master weights; at ZeRO-0 the model-states file
holds the module; a pipeline writes every layer to a file of its own. The slices are joined as the
run's universal_checkpoint_info (saved in every checkpoint) describes each parameter's TP split,
and Megatron's vocab padding is cut, so the result is the same for the same model whatever layout
trained it. Names are the PP=1 Decoder's (gridtrain.model.naming). Files are memory-mapped and a
tensor is only read when asked for, so a converter can hold one layer at a time.
"""
from pathlib import Path

import torch

from gridtrain.model.naming import parameter_name, split_name
from gridtrain.parallel import deepspeed_compat as ds_files
from gridtrain.train.checkpoint.manifest import read_manifest, saved_model
from gridtrain.train.checkpoint.save import DS_TAG
from gridtrain.train.checkpoint.store import CheckpointError


def _load(path: Path) -> dict:
    # DeepSpeed's files are pickles holding non-tensor objects: only checkpoints whose manifest
    # verified (written by gridtrain's save) are read here.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


class CheckpointWeights:
    """Full tensors of the checkpoint folder `ckpt` by Decoder name. The caller verifies the
    manifest first: reading trusts the files."""

    def __init__(self, ckpt: Path):
        self.path = Path(ckpt)
        layout = read_manifest(self.path)["layout"]
        self.model = saved_model(self.path)
        ds_dir = self.path / DS_TAG
        self._slices = self._tp_slices(ds_dir, layout)
        self._kinds, self._vocab_size = self._split_kinds(ds_dir, layout["zero_stage"])

    def _tp_slices(self, ds_dir: Path, layout: dict) -> list[dict]:
        """Per TP rank, its (lazy) slices of every parameter, all pipeline stages merged."""
        tp, zero, model = layout["tp"], layout["zero_stage"], self.model
        slices = [{} for _ in range(tp)]
        if layout["pp"] > 1:
            for (layer, tp_rank), path in sorted(ds_files.pipeline_layer_files(ds_dir).items()):
                for key, tensor in _load(path).items():
                    if tensor is not None:
                        slices[tp_rank].setdefault(parameter_name(layer, key, model.num_layers, model.tied), tensor)
        elif zero == 0:
            for tp_rank in range(tp):
                module = _load(ds_files.model_states_file(ds_dir, tp_rank, zero))["module"]
                slices[tp_rank] = {k: v for k, v in module.items() if v is not None}
        else:
            slices = [ds_files.zero_fp32_weights(ds_dir, tp_rank) for tp_rank in range(tp)]
        return slices

    @staticmethod
    def _split_kinds(ds_dir: Path, zero: int) -> tuple[dict, int]:
        """(name -> "replicated" | "row" | "vocab", unpadded vocab size) from the universal
        checkpoint info; parameters it does not name are split along dim 0 (column-parallel)."""
        info = _load(ds_files.model_states_file(ds_dir, 0, zero)).get(ds_files.UNIVERSAL_KEY)
        if not info:
            raise CheckpointError(f"{ds_dir}: no {ds_files.UNIVERSAL_KEY} in its model states; it was not written by gridtrain")
        return ds_files.universal_split_kinds(info)

    def names(self) -> list[str]:
        """Every parameter, in layer order."""
        return sorted(self._slices[0], key=lambda name: split_name(name, self.model.num_layers))

    def shape(self, name: str) -> tuple:
        shapes = [tuple(part[name].shape) for part in self._slices]
        kind = self._kinds.get(name, "column")
        if kind == "replicated":
            return shapes[0]
        dim = 1 if kind == "row" else 0
        full = list(shapes[0])
        full[dim] = sum(shape[dim] for shape in shapes)
        if kind == "vocab":
            full[0] = self._vocab_size
        return tuple(full)

    def tensor(self, name: str) -> torch.Tensor:
        """The full fp32 tensor of parameter `name`, vocab padding removed (a new tensor with no
        autograd state: zero_to_fp32's lazy tensors materialise as Parameters that require grad,
        which numpy(), as in every exporter, refuses)."""
        parts = [part[name].contiguous().detach().float() for part in self._slices]
        kind = self._kinds.get(name, "column")
        if kind == "replicated":
            return parts[0].clone()
        tensor = torch.cat(parts, dim=1 if kind == "row" else 0)
        return tensor[:self._vocab_size].clone() if kind == "vocab" else tensor


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """name -> full fp32 tensor of every parameter of the checkpoint folder `ckpt`."""
    weights = CheckpointWeights(ckpt)
    return {name: weights.tensor(name) for name in weights.names()}
