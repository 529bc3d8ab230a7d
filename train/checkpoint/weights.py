"""The full, layout-free fp32 weights of a checkpoint, read from its files in one process, without
process groups: what conversion and the layout-equivalence tests read.

Each TP rank's slices come from DeepSpeed's files: at PP=1 with ZeRO 1-3, DeepSpeed's own
zero_to_fp32 merges the DP partitions of the fp32 master weights; at ZeRO-0 the model-states file
holds the module; a pipeline writes every layer to a file of its own. The slices are then joined
as the run's universal_checkpoint_info (saved in every checkpoint) describes each parameter's TP
split, and Megatron's vocab padding is cut, so the result is the same for the same model whatever
layout trained it. Names are the PP=1 Decoder's (gridtrain.model.naming).
"""
import json
import re
from pathlib import Path

import torch

from gridtrain.model.config import ModelConfig
from gridtrain.model.naming import parameter_name
from gridtrain.parallel import deepspeed_compat as ds_files
from gridtrain.train.checkpoint.manifest import STATE_NAME, read_manifest
from gridtrain.train.checkpoint.reshard import UNIVERSAL_KEY
from gridtrain.train.checkpoint.save import DS_TAG
from gridtrain.train.checkpoint.store import CheckpointError


def saved_model(ckpt: Path) -> ModelConfig:
    """The model section of the run that wrote `ckpt`."""
    config = json.loads((Path(ckpt) / STATE_NAME).read_text(encoding="utf-8"))["config"]
    return ModelConfig(**config["model"])


def _load(path: Path) -> dict:
    # DeepSpeed's files are pickles with non-tensor objects: only checkpoints whose manifest
    # verified (written by gridtrain's save) are read here.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _tp_slices(ds_dir: Path, layout: dict, model: ModelConfig) -> list[dict[str, torch.Tensor]]:
    """Per TP rank, its slices of every parameter (all pipeline stages merged), fp32."""
    tp, pp, zero = layout["tp"], layout["pp"], layout["zero_stage"]
    slices = [{} for _ in range(tp)]
    if pp > 1:
        for (layer, tp_rank), path in sorted(ds_files.pipeline_layer_files(ds_dir).items()):
            for key, tensor in _load(path).items():
                if tensor is not None:
                    slices[tp_rank].setdefault(parameter_name(layer, key, model.num_layers, model.tied), tensor)
    elif zero == 0:
        for tp_rank in range(tp):
            module = _load(ds_files.model_states_file(ds_dir, tp_rank, zero))["module"]
            slices[tp_rank] = {k: v for k, v in module.items() if v is not None}
    else:
        for tp_rank in range(tp):
            slices[tp_rank] = dict(ds_files.zero_fp32_weights(ds_dir, tp_rank))
    return [{name: t.float() for name, t in part.items()} for part in slices]


def _split_kinds(ds_dir: Path, zero: int) -> tuple[dict, int]:
    """(parameter name -> "replicated" | "row" | "vocab", unpadded vocab size) from the universal
    checkpoint info every rank added to the client state; unnamed parameters are column-parallel."""
    info = _load(ds_files.model_states_file(ds_dir, 0, zero)).get(UNIVERSAL_KEY)
    if not info:
        raise CheckpointError(f"{ds_dir}: no {UNIVERSAL_KEY} in its model states; it was not written by gridtrain")
    kinds = {}
    for kind, key in (("replicated", "tp_replicated_parameter_patterns"), ("row", "parameter_with_row_parallelism_patterns"),
                      ("vocab", "vocabulary_parameter_patterns")):
        for pattern in info.get(key, []):
            kinds[re.sub(r"^\^|\$$", "", pattern).replace("\\", "")] = kind
    return kinds, info["original_vocab_size"]


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """name -> full fp32 tensor of every parameter of the checkpoint folder `ckpt`, vocab padding
    removed. The caller verifies the manifest first (reading trusts the files)."""
    ckpt = Path(ckpt)
    layout = read_manifest(ckpt)["layout"]
    ds_dir = ckpt / DS_TAG
    slices = _tp_slices(ds_dir, layout, saved_model(ckpt))
    kinds, vocab_size = _split_kinds(ds_dir, layout["zero_stage"])
    full = {}
    for name in slices[0]:
        parts = [part[name] for part in slices]
        kind = kinds.get(name, "column")
        if kind == "replicated":
            tensor = parts[0]
        else:
            tensor = torch.cat(parts, dim=1 if kind == "row" else 0)
        full[name] = tensor[:vocab_size].clone() if kind == "vocab" else tensor.clone()
    return full
