"""Worker for test_multirank_data: 2 gloo ranks build the datasets on a fresh cache folder (rank 0
builds, rank 1 must load what rank 0 wrote), read their DP micro-batches, and rank 0 compares the
gathered global batches with a DP=1 reading of the same dataset. Writes result.json on rank 0."""
import json
import sys
import warnings

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gridtrain.data.config import DataConfig  # noqa: E402
from gridtrain.data.datasets import build_datasets  # noqa: E402
from gridtrain.data.loader import batches  # noqa: E402
from gridtrain.data.tokenizer import SentencePieceTokenizer  # noqa: E402


def main(prefix_a: str, prefix_b: str, tokenizer: str, cache: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(blend=((0.3, prefix_a), (0.7, prefix_b)), seq_length=32, split="90,5,5", reset_position_ids=True)
    train, valid, _ = build_datasets(cfg, (240, 40, 40), cache, SentencePieceTokenizer(tokenizer))
    loaded = [isinstance(d.shuffle_index, np.memmap) for d in train.datasets] + [isinstance(train.dataset_index, np.memmap)]
    consumed, mbs, steps = 16, 4, 5  # as if resumed after 2 global steps of 8 samples
    stream = batches(train, consumed, mbs, rank, world, cfg)
    mine = [next(stream) for _ in range(steps)]
    gathered = []
    for batch in mine:
        parts = [torch.zeros_like(batch["tokens"]) for _ in range(world)]
        ids = [torch.zeros_like(batch["sample_ids"]) for _ in range(world)]
        dist.all_gather(parts, batch["tokens"])
        dist.all_gather(ids, batch["sample_ids"])
        gathered.append((torch.cat(ids), torch.cat(parts)))
    flags = [torch.tensor(loaded, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(flags, torch.tensor(loaded, dtype=torch.int64))
    if rank == 0:
        reference = batches(train, consumed, mbs * world, 0, 1, cfg)
        same = []
        for ids, tokens in gathered:
            ref = next(reference)
            same.append(bool(torch.equal(ids, ref["sample_ids"]) and torch.equal(tokens, ref["tokens"])))
        result = {"same": same, "first_ids": gathered[0][0].tolist(), "loaded": [f.tolist() for f in flags],
                  "valid_len": len(valid)}
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
