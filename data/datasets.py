"""Training datasets: megatron-core's GPTDataset over our shards, blended by
BlendedMegatronDatasetBuilder, with the sample-index caches built by one rank only.

megatron-core writes its cache files (.npy + description) in place and treats a folder holding all
of them as a hit, so a rank killed mid-write would leave a cache that later runs trust. We keep a
manifest of the files a finished build produced and, before building, delete any cache file that
is not in it (left by an interrupted build), so megatron-core rebuilds it."""
import contextlib
import json
import os
from typing import Optional

import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from gridtrain.data.config import (
    DataConfig,
    blend_problems,
    finetune_problems,
    is_finetune_blend,
    missing_shard_problems,
)
from gridtrain.data.finetune import build_finetune_datasets
from gridtrain.errors import ConfigError

MANIFEST = "gridtrain-cache-manifest.json"


def parse_blend(blend) -> tuple[list[str], Optional[list[float]]]:
    """data.blend ([[weight, prefix], ...]) -> (prefixes, weights), after the blend's rules
    (gridtrain.data.config) for callers that did not validate. Weights are None for a single
    prefix, which megatron-core then samples directly."""
    problems = blend_problems(blend)
    if problems:
        raise ConfigError(problems)
    problems = missing_shard_problems(blend)
    if problems:
        raise ConfigError(problems)
    prefixes = [prefix for _, prefix in blend]
    weights = [float(weight) for weight, _ in blend]
    return prefixes, (weights if len(prefixes) > 1 else None)


def run_samples(steps: int, global_batch_size: int, eval_steps: int) -> tuple[int, int, int]:
    """Samples a run asks of (train, valid, test): steps * global batch for training, and one fixed
    validation set of eval_steps global batches (Megatron's eval-iters), reused at every evaluation
    so validation losses compare across steps, and the same at any TP x PP x DP. The counts key
    megatron-core's index caches, so `gridtrain data index` and the trainer both use this."""
    eval_samples = eval_steps * global_batch_size
    return steps * global_batch_size, eval_samples, eval_samples


def gpt_dataset_config(cfg: DataConfig, cache_dir: str, tokenizer):
    return GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=parse_blend(cfg.blend),
        split=cfg.split,
        path_to_cache=os.path.abspath(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        # The model builds its causal/segment mask from segment_ids; an [s, s] mask per sample
        # would only cost memory and time here.
        create_attention_mask=False,
    )


def build_datasets(cfg: DataConfig, num_samples: tuple[int, int, int], cache_dir: str, tokenizer):
    """(train, valid, test) datasets with at least num_samples samples each (None for a split with
    a 0% share): megatron-core's for text shards, gridtrain.data.finetune's for fine-tuning shards. Collective when torch.distributed is initialized: call it on every rank; rank 0
    builds missing index caches in cache_dir, the others wait at a barrier and load them."""
    if is_finetune_blend(cfg.blend):
        problems = finetune_problems(cfg.blend)
        if problems:
            raise ConfigError(problems)
        return build_finetune_datasets(cfg, num_samples, pad_id=tokenizer.eod)
    config = gpt_dataset_config(cfg, cache_dir, tokenizer)
    check_split_sizes(config, num_samples)
    with single_rank_group_if_needed():
        is_rank0 = dist.get_rank() == 0
        if is_rank0:
            discard_unfinished_cache(cache_dir)
        builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
        train, valid, test = builder.build()
        if is_rank0:
            record_finished_cache(cache_dir)
        dist.barrier()
    return train, valid, test


def check_split_sizes(config, num_samples) -> None:
    """Every split asked for samples must receive at least one document of every prefix
    (megatron-core loops forever on an empty one): the split is taken over document counts."""
    problems = []
    for prefix in config.blend[0]:
        documents = IndexedDataset(prefix).sequence_lengths.shape[0]
        for name, bounds, wanted in zip(("train", "valid", "test"), config.split_matrix, num_samples):
            if not wanted or bounds is None:
                continue
            count = int(round(bounds[1] * documents)) - int(round(bounds[0] * documents))
            if count < 1:
                problems.append(("data.split", config.split,
                                 f"the {name} split of {prefix} gets 0 of its {documents} documents but "
                                 f"{wanted} samples are needed; give {name} a larger share, or set it to 0 "
                                 "and disable what uses it (train.eval_steps for valid)"))
    if problems:
        raise ConfigError(problems)


@contextlib.contextmanager
def single_rank_group_if_needed():
    """megatron-core's BlendedDataset asks torch.distributed for the rank unconditionally, so an
    offline build (`gridtrain data index`, tests) runs inside a throw-away 1-rank gloo group."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def cache_files(cache_dir: str) -> dict[str, int]:
    if not os.path.isdir(cache_dir):
        return {}
    return {
        name: os.path.getsize(os.path.join(cache_dir, name))
        for name in os.listdir(cache_dir)
        if name.endswith((".npy", ".txt"))
    }


def read_manifest(cache_dir: str) -> dict[str, int]:
    try:
        with open(os.path.join(cache_dir, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def discard_unfinished_cache(cache_dir: str) -> list[str]:
    """Delete cache files that no finished build recorded (or whose size changed)."""
    finished = read_manifest(cache_dir)
    removed = [name for name, size in cache_files(cache_dir).items() if finished.get(name) != size]
    for name in removed:
        os.remove(os.path.join(cache_dir, name))
    return removed


def record_finished_cache(cache_dir: str) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, MANIFEST)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(cache_files(cache_dir), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def default_cache_dir(cfg: DataConfig, run_dir: str) -> str:
    """data.cache_dir, else <run_dir>/index-cache (one cache per run folder)."""
    return cfg.cache_dir or os.path.join(run_dir, "index-cache")
