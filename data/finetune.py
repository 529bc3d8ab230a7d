"""Fine-tuning data: the documents of `gridtrain preprocess --format completion|chat` shards (token
shard + loss-mask shard, aligned) as training samples of data.seq_length tokens.

Which shards these are is read from the shards themselves: PREFIX_loss_mask.bin/.idx beside the
tokens, and the format recorded in the preprocess summary. A blend is all fine-tuning or all text.

Samples. Each split (data.split over every prefix's documents, as for text) is a pool of
documents; a blend weight is how often each of its documents appears per epoch (a whole number:
weight 2 upsamples a prefix). Every epoch shuffles the pool with (data.seed, epoch, split) and
packs it: documents go, in that order, into the first of the last PACK_WINDOW open sequences of
seq_length + 1 tokens with room for them (first fit over a window: order is nearly kept and little
room wasted); with data.pack false each document is a sequence of its own, padded. A document longer
than seq_length + 1 tokens is cut to that length, or left out with data.overlong: drop; both counted.
Epochs follow each other until the run's samples are reached, so a small data set is seen many
times, reshuffled, and sample i is the same whatever the layout or the restart: resuming needs only
the consumed-sample count, as for pretraining.

A sample holds inputs t[:-1] and labels t[1:] of its packed tokens t; the loss mask is the label's
mask bit, and 0 where the label is the first token of the next document or padding. Positions
restart at 0 in every document and segment ids number the documents, so the decoder's attention
never crosses a document boundary (padding is a segment of its own). `loss_tokens[i]` is sample i's
count of labels in the loss: the trainer divides each micro-batch's summed loss by the global batch's
count, so every answer token weighs the same wherever it is trained (gridtrain.data.loader)."""
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset

from gridtrain.data.shards import LOSS_MASK_SUFFIX
from gridtrain.errors import ConfigError

PACK_WINDOW = 16


@dataclass
class Documents:
    """The documents of one split: (shard, document index) pairs with their token counts."""
    tokens: list  # IndexedDataset per shard
    masks: list
    shard: np.ndarray  # int32 [n]
    index: np.ndarray  # int64 [n]
    length: np.ndarray  # int64 [n]


def split_documents(blend, split: tuple, which: int) -> Documents:
    """Split `which` (0 train, 1 valid, 2 test) of every prefix, each document repeated by its weight."""
    tokens = [IndexedDataset(prefix) for _, prefix in blend]
    masks = [IndexedDataset(prefix + LOSS_MASK_SUFFIX) for _, prefix in blend]
    shard, index = [], []
    for s, ((weight, _), data) in enumerate(zip(blend, tokens)):
        count = len(data)
        lo, hi = int(round(split[which][0] * count)), int(round(split[which][1] * count))
        for _ in range(int(weight)):
            shard.append(np.full(hi - lo, s, dtype=np.int32))
            index.append(np.arange(lo, hi, dtype=np.int64))
    shard = np.concatenate(shard) if shard else np.zeros(0, np.int32)
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    length = np.array([tokens[s].sequence_lengths[i] for s, i in zip(shard, index)], dtype=np.int64)
    return Documents(tokens, masks, shard, index, length)


@dataclass
class PackStats:
    documents: int = 0
    truncated: int = 0
    dropped: int = 0
    epochs: int = 0
    real_tokens: int = 0
    positions: int = 0

    @property
    def efficiency(self) -> float:
        """Fraction of sequence positions holding document tokens."""
        return self.real_tokens / max(self.positions, 1)


def pack(lengths: list, capacity: int, packed: bool) -> list[list[int]]:
    """Bins of positions into `lengths` (each <= capacity): first fit over the last PACK_WINDOW
    open bins, or one per document."""
    if not packed:
        return [[i] for i in range(len(lengths))]
    done, open_bins, room = [], [], []
    for i, length in enumerate(lengths):
        for b, free in enumerate(room):
            if length <= free:
                open_bins[b].append(i)
                room[b] -= length
                break
        else:
            open_bins.append([i])
            room.append(capacity - length)
            if len(open_bins) > PACK_WINDOW:
                done.append(open_bins.pop(0))
                room.pop(0)
    return done + open_bins


@dataclass
class Packing:
    """Which pieces of which documents make each sample: sample i is pieces starts[i]:starts[i + 1],
    piece p the first length[p] tokens of document doc[p] of the split."""
    doc: np.ndarray  # int64 [pieces]
    length: np.ndarray  # int64 [pieces]
    starts: np.ndarray  # int64 [samples + 1]
    stats: PackStats


def pack_epochs(docs: Documents, samples: int, capacity: int, seed: int, which: int, packed: bool,
                overlong: str) -> Packing:
    """Epochs of `docs`, each shuffled with (seed, epoch, which) and packed into sequences of
    `capacity` tokens, until `samples` samples (fewer if every document is left out)."""
    stats = PackStats(documents=len(docs.length))
    pieces_doc, pieces_len, starts = [], [], [0]
    while len(starts) - 1 < samples and len(docs.length):
        order = np.random.default_rng([seed, stats.epochs, which]).permutation(len(docs.length))
        lengths = np.minimum(docs.length[order], capacity)
        keep = np.ones(len(order), dtype=bool) if overlong == "truncate" else docs.length[order] <= capacity
        if stats.epochs == 0:
            stats.truncated = int((docs.length > capacity).sum()) if overlong == "truncate" else 0
            stats.dropped = int((~keep).sum())
        order, lengths = order[keep], lengths[keep]
        if not len(order):
            break
        for members in pack(lengths.tolist(), capacity, packed):
            pieces_doc += [int(order[m]) for m in members]
            pieces_len += [int(lengths[m]) for m in members]
            starts.append(len(pieces_doc))
            stats.real_tokens += int(sum(lengths[m] for m in members))
            stats.positions += capacity
        stats.epochs += 1
    return Packing(np.array(pieces_doc, dtype=np.int64), np.array(pieces_len, dtype=np.int64),
                   np.array(starts[:samples + 1], dtype=np.int64), stats)


class FineTuneDataset(torch.utils.data.Dataset):
    """The packed samples of one split; item i is a dict of tokens, labels, loss_mask,
    position_ids and segment_ids ([seq_length] each)."""

    def __init__(self, docs: Documents, packing: Packing, seq_length: int, pad_id: int):
        self.docs, self.seq_length, self.pad_id = docs, seq_length, pad_id
        self.pieces_doc, self.pieces_len, self.starts = packing.doc, packing.length, packing.starts
        self.stats = packing.stats
        self._counted: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self.starts) - 1

    def _pieces(self, i: int):
        for p in range(self.starts[i], self.starts[i + 1]):
            d, length = self.pieces_doc[p], self.pieces_len[p]
            s, index = self.docs.shard[d], self.docs.index[d]
            yield (self.docs.tokens[s][index][:length].astype(np.int64),
                   self.docs.masks[s][index][:length].astype(np.int64))

    def _packed(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """tokens, mask, segment, position of sample i over seq_length + 1 positions."""
        pieces = list(self._pieces(i))
        capacity = self.seq_length + 1
        used = sum(len(t) for t, _ in pieces)
        pad = capacity - used
        tokens = np.concatenate([t for t, _ in pieces] + [np.full(pad, self.pad_id, np.int64)])
        mask = np.concatenate([m for _, m in pieces] + [np.zeros(pad, np.int64)])
        segment = np.concatenate([np.full(len(t), k, np.int64) for k, (t, _) in enumerate(pieces)]
                                 + [np.full(pad, len(pieces), np.int64)])
        position = np.concatenate([np.arange(len(t), dtype=np.int64) for t, _ in pieces] + [np.arange(pad, dtype=np.int64)])
        return tokens, mask, segment, position

    def loss_tokens(self, first: int, count: int) -> int:
        """Labels in the loss over samples [first, first + count): a global batch's answer tokens.
        Reads only the masks; remembered, since every micro-batch of the global batch asks."""
        key = (first, count)
        if key not in self._counted:
            total = 0
            for p in range(self.starts[first], self.starts[min(first + count, len(self))]):
                d, length = self.pieces_doc[p], self.pieces_len[p]
                total += int(self.docs.masks[self.docs.shard[d]][self.docs.index[d]][1:length].sum())
            if len(self._counted) > 64:
                self._counted.clear()
            self._counted[key] = total
        return self._counted[key]

    def __getitem__(self, i: int) -> dict:
        tokens, mask, segment, position = self._packed(int(i))
        same = segment[1:] == segment[:-1]
        return {
            "tokens": torch.from_numpy(tokens[:-1]),
            "labels": torch.from_numpy(tokens[1:]),
            "loss_mask": torch.from_numpy((mask[1:] * same).astype(np.float32)),
            "position_ids": torch.from_numpy(position[:-1]),
            "segment_ids": torch.from_numpy(segment[:-1]),
        }


def build_finetune_datasets(cfg, num_samples: tuple, pad_id: int) -> tuple:
    """(train, valid, test) FineTuneDatasets of `cfg` (DataConfig) with num_samples samples each (None
    for a split with no share or no samples asked)."""
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    out = []
    for which, (wanted, bounds) in enumerate(zip(num_samples, split_matrix)):
        if not wanted or bounds is None:
            out.append(None)
            continue
        docs = split_documents(cfg.blend, split_matrix, which)
        name = ("train", "valid", "test")[which]
        if not len(docs.length):
            raise ConfigError([("data.split", cfg.split, f"the {name} split gets none of the fine-tuning documents but "
                                f"{wanted} samples are needed; give {name} a larger share, or set it to 0 and disable "
                                "what uses it (train.eval_steps for valid)")])
        packing = pack_epochs(docs, wanted, cfg.seq_length + 1, cfg.seed, which, cfg.pack, cfg.overlong)
        dataset = FineTuneDataset(docs, packing, cfg.seq_length, pad_id)
        if len(dataset) < wanted:  # every document was longer than a sequence and left out
            raise ConfigError([("data.overlong", cfg.overlong, f"every document of the {name} split is longer than "
                                f"data.seq_length + 1 = {cfg.seq_length + 1} tokens; use truncate, or a longer "
                                "data.seq_length")])
        out.append(dataset)
    return tuple(out)
