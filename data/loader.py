"""Micro-batches for one DP rank, in Megatron's MegatronPretrainingSampler order.

Global samples are consumed in index order (the datasets are already shuffled by their seed);
each chunk of micro_batch_size * dp_size consecutive samples is split so DP rank r takes
[r * mbs, (r + 1) * mbs). A global batch therefore covers the same samples at any DP size, and
resuming needs nothing but the consumed-sample count."""
from typing import Iterator

import torch

from gridtrain.data.config import DataConfig
from gridtrain.errors import UserError


class PretrainingBatchSampler:
    """Index lists of this rank's micro-batches from global sample `consumed_samples` on; stops at
    the last complete chunk (drop_last, like Megatron)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self) -> Iterator[list[int]]:
        chunk = self.micro_batch_size * self.dp_size
        first = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - chunk + 1, chunk):
            yield list(range(start + first, start + first + self.micro_batch_size))

    def __len__(self) -> int:
        chunk = self.micro_batch_size * self.dp_size
        return max(0, (self.total_samples - self.consumed_samples) // chunk)


def segment_ids_of(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Document index of each position within a sample: Megatron's rule is that the token after
    an EOD starts a new document, so the EOD itself still belongs to the document it ends.
    tokens: [..., s] int64 -> [..., s] int64."""
    is_eod = (tokens == eod).to(torch.int64)
    return torch.cumsum(is_eod, dim=-1) - is_eod


class Collate:
    """Stacks dataset samples into the trainer's batch dict (picklable for loader workers).
    GPTDataset samples get their segment ids from the EOD tokens; fine-tuning samples bring theirs,
    and a `loss_normalizer` per sample: the answer tokens of its global batch over the number of
    micro-batches in it, so that the engine's mean of micro-batch losses (each the masked sum over
    it) is the mean over every answer token of the global batch."""

    def __init__(self, eod: int, dataset=None, global_batch_size: int | None = None, micro_batch_size: int = 1):
        self.eod = eod
        self.dataset = dataset if hasattr(dataset, "loss_tokens") else None
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size

    def __call__(self, items: list[tuple[int, dict]]) -> dict:
        sample_ids = torch.tensor([index for index, _ in items], dtype=torch.int64)
        samples = [sample for _, sample in items]
        tokens = torch.stack([s["tokens"] for s in samples]).to(torch.int64)
        batch = {
            "tokens": tokens,
            "labels": torch.stack([s["labels"] for s in samples]).to(torch.int64),
            "position_ids": torch.stack([s["position_ids"] for s in samples]).to(torch.int64),
            "segment_ids": (torch.stack([s["segment_ids"] for s in samples]).to(torch.int64)
                            if "segment_ids" in samples[0] else segment_ids_of(tokens, self.eod)),
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]).to(torch.float32),
            "sample_ids": sample_ids,
        }
        if self.dataset is not None and self.global_batch_size:
            size = self.global_batch_size
            per_batch = size // self.micro_batch_size
            batch["loss_normalizer"] = torch.tensor(
                [max(self.dataset.loss_tokens(int(i) // size * size, size), 1) / per_batch for i in sample_ids],
                dtype=torch.float32)
        return batch


class IndexedSamples(torch.utils.data.Dataset):
    """Pairs each sample with its global index, so batches can carry sample_ids."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return index, self.dataset[int(index)]


def dataset_eod(dataset) -> int:
    if hasattr(dataset, "pad_id"):  # fine-tuning samples carry their own segment ids
        return dataset.pad_id
    inner = dataset.datasets[0] if hasattr(dataset, "datasets") else dataset
    return inner.config.tokenizer.eod


def batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
            cfg: DataConfig, global_batch_size: int | None = None) -> Iterator[dict]:
    """This DP rank's micro-batches: dicts of tokens, labels, position_ids, segment_ids (int64
    [b, s]), loss_mask (float32 [b, s]) and sample_ids (int64 [b], global sample index); for
    fine-tuning data given `global_batch_size`, also loss_normalizer (float32 [b]).
    cfg.num_workers > 0 reads in that many background processes (same order)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    total = len(dataset)
    if consumed_samples > total:
        raise UserError(f"consumed_samples={consumed_samples}: the dataset holds only {total} "
                        "samples; it was built for a shorter run (raise train.steps consistently)")
    sampler = PretrainingBatchSampler(total, consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        IndexedSamples(dataset), batch_sampler=sampler,
        collate_fn=Collate(dataset_eod(dataset), dataset, global_batch_size, micro_batch_size),
        num_workers=cfg.num_workers, persistent_workers=False,
    )
    return iter(loader)
