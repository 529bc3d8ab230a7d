"""Safetensors files written one tensor at a time, so an export holds one layer in memory, not a
shard. The safetensors library writes only whole dicts of tensors (save_file / serialize take every
tensor of the file at once); its format is an 8-byte header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes in that order. Every shape is known before any
tensor is read, so the header is written first and each tensor streams in after it. The files are
read back with safetensors' own reader in the tests and by transformers."""
import json
import os
import struct
from dataclasses import dataclass, field

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass
class Planned:
    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class ShardPlan:
    """The tensors of one file, in the order their bytes follow the header."""
    filename: str
    tensors: list[Planned] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[Planned], max_shard_bytes: int, stem: str = "model") -> list[ShardPlan]:
    """Tensors (in write order) packed into files of at most max_shard_bytes each (a larger tensor
    gets a file of its own), named as transformers names them."""
    shards: list[ShardPlan] = []
    for tensor in tensors:
        if not shards or (shards[-1].tensors and shards[-1].nbytes + tensor.nbytes > max_shard_bytes):
            shards.append(ShardPlan(""))
        shards[-1].tensors.append(tensor)
    for i, shard in enumerate(shards):
        shard.filename = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def header_bytes(shard: ShardPlan, metadata: dict | None = None) -> bytes:
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for tensor in shard.tensors:
        header[tensor.name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """Writes one planned shard: the header at open, then each tensor in plan order."""

    def __init__(self, path, shard: ShardPlan):
        self.shard = shard
        self.fh = open(path, "wb")
        self.fh.write(header_bytes(shard))
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> int:
        planned = self.shard.tensors[self.next]
        if (name, tuple(tensor.shape), tensor.dtype) != (planned.name, planned.shape, planned.dtype):
            raise ValueError(f"{self.shard.filename}: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {planned.name} {planned.shape} {planned.dtype}")
        data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()
        self.fh.write(memoryview(data))
        self.next += 1
        return planned.nbytes

    @property
    def done(self) -> bool:
        return self.next == len(self.shard.tensors)

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
