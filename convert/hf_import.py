"""A Hugging Face folder (config.json + safetensors, or pickle .bin files with --trust-pickle) as
gridtrain weights: the model section its config describes (gridtrain.convert.hf_config), and its
tensors under gridtrain's names, read one layer at a time. Needs no transformers: safetensors
memory-maps the tensors."""
from pathlib import Path

import torch
from safetensors import safe_open

from gridtrain.convert.hf_config import model_config_from_hf
from gridtrain.convert.hf_names import from_hf, hf_names
from gridtrain.errors import UserError
from gridtrain.model.naming import layer_count, parameter_name, split_name


class HFWeights:
    """The tensors of an HF folder under gridtrain names (full, unpadded), one layer at a time."""

    def __init__(self, folder: Path, trust_pickle: bool = False):
        self.path = Path(folder)
        self.model = model_config_from_hf(self.path)
        self._tensors = _open_tensors(self.path, trust_pickle)
        self._layer: tuple[int, dict] | None = None
        missing = [name for layer in range(layer_count(self.model.num_layers))
                   for name in hf_names(self.model, layer) if name not in self._tensors]
        if missing:
            raise UserError(f"{self.path}: tensor {missing[0]} is missing ({len(missing)} missing in all); "
                            "the weights do not match config.json")

    def _layer_tensors(self, layer: int) -> dict:
        if self._layer is None or self._layer[0] != layer:
            self._layer = (layer, from_hf(self.model, layer, lambda name: self._tensors[name]().float()))
        return self._layer[1]

    def names(self) -> list[str]:
        cfg = self.model
        return [parameter_name(layer, key, cfg.num_layers, cfg.tied)
                for layer in range(layer_count(cfg.num_layers)) for key in self._layer_tensors(layer)]

    def tensor(self, name: str) -> torch.Tensor:
        layer, key = split_name(name, self.model.num_layers)
        return self._layer_tensors(layer)[key]

    def shape(self, name: str) -> tuple:
        return tuple(self.tensor(name).shape)


def _open_tensors(folder: Path, trust_pickle: bool) -> dict:
    """HF name -> a function returning that tensor: safetensors memory-mapped, or pickles loaded
    (weights only) when the user allowed it."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        getters = {}
        for path in files:
            handle = safe_open(str(path), framework="pt")
            for name in handle.keys():
                getters[name] = (lambda h, n: lambda: h.get_tensor(n))(handle, name)
        return getters
    pickles = sorted(folder.glob("*.bin"))
    if not pickles:
        raise UserError(f"{folder}: no *.safetensors or *.bin weights next to config.json")
    if not trust_pickle:
        raise UserError(f"{folder}: holds only pickle weights ({pickles[0].name}); loading a pickle can run code "
                        "from the file: convert it to safetensors, or pass --trust-pickle if you trust its origin")
    tensors = {}
    for path in pickles:
        tensors.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return {name: (lambda t: lambda: t)(tensor) for name, tensor in tensors.items()}
