"""Training datasets and the sampler: blend shares, per-sample fields, global order across DP sizes
and restarts, index caches (prebuilt offline, rebuilt after an interrupted build)."""
import os

import numpy as np
import pytest
import torch
from shared_corpus import write_jsonl

from gridtrain.data.config import DataConfig
from gridtrain.data.datasets import build_datasets, read_manifest
from gridtrain.data.loader import batches, segment_ids_of
from gridtrain.data.preprocess import PreprocessOptions, preprocess
from gridtrain.data.tokenizer import SentencePieceTokenizer
from gridtrain.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    return SentencePieceTokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def two_prefixes(tmp_path_factory, corpus_docs, tokenizer_model):
    out = tmp_path_factory.mktemp("blend")
    prefixes = []
    for name, docs in (("a", corpus_docs[:30]), ("b", corpus_docs[30:])):
        path = write_jsonl(out / f"{name}.jsonl", docs)
        preprocess(PreprocessOptions(inputs=(path,), tokenizer=tokenizer_model, output_prefix=str(out / name)),
                   open(os.devnull, "w"))
        prefixes.append(str(out / name))
    return prefixes


def test_blend_shares_match_weights(tmp_path, two_prefixes, tokenizer):
    cfg = DataConfig(blend=((0.25, two_prefixes[0]), (0.75, two_prefixes[1])), seq_length=32, split="90,5,5")
    train, valid, _ = build_datasets(cfg, (4000, 200, 200), str(tmp_path / "cache"), tokenizer)
    assert len(train) == 4000 and len(valid) == 200
    ids = np.array([train[i]["dataset_id"] for i in range(4000)])
    share_b = float(np.mean(ids == 1))
    assert abs(share_b - 0.75) < 0.02
    assert abs(share_b - 0.5) > 0.02  # negative control: an even blend would be caught
    # Samples drawn from each prefix hold that prefix's tokens.
    stream_b = np.concatenate([train.datasets[1].dataset[i] for i in range(len(train.datasets[1].dataset))])
    sample = train[int(np.argmax(ids == 1))]["tokens"].numpy()
    windows = np.lib.stride_tricks.sliding_window_view(stream_b, len(sample))
    assert (windows == sample).all(axis=1).any()


def reference_fields(tokens: list[int], eod: int):
    """Megatron semantics written out by hand: a new document starts after each EOD."""
    positions, segments, position, segment = [], [], 0, 0
    for token in tokens:
        positions.append(position)
        segments.append(segment)
        position, segment = (0, segment + 1) if token == eod else (position + 1, segment)
    return positions, segments, [0.0 if t == eod else 1.0 for t in tokens]


def test_sample_fields_follow_megatron_document_rules(tmp_path, shard_prefix, tokenizer):
    base = dict(blend=((1.0, shard_prefix),), seq_length=64, split="100,0,0")
    reset = DataConfig(**base, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    train = build_datasets(reset, (200, 0, 0), str(tmp_path / "c1"), tokenizer)[0]
    crossing, with_eod = 0, None
    for batch in batches(train, 0, 8, 0, 1, reset):
        if bool((batch["tokens"][:, :-1] == tokenizer.eod).any()):
            with_eod = batch["tokens"]
        for row in range(8):
            tokens = batch["tokens"][row].tolist()
            positions, segments, loss_mask = reference_fields(tokens, tokenizer.eod)
            assert batch["position_ids"][row].tolist() == positions
            assert batch["segment_ids"][row].tolist() == segments
            assert batch["loss_mask"][row].tolist() == loss_mask
            assert batch["labels"][row, :-1].tolist() == tokens[1:]
            crossing += segments[-1] > 0
    assert crossing > 10  # the check saw samples spanning documents
    wrong = torch.cumsum((with_eod == tokenizer.eod).long(), -1)  # negative control: EOD opening the next segment
    assert not torch.equal(wrong, segment_ids_of(with_eod, tokenizer.eod))
    plain = DataConfig(**base)
    batch = next(batches(build_datasets(plain, (200, 0, 0), str(tmp_path / "c2"), tokenizer)[0], 0, 4, 0, 1, plain))
    assert torch.equal(batch["position_ids"], torch.arange(64).expand(4, 64)) and bool((batch["loss_mask"] == 1).all())
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
        "tokens": (torch.int64, (4, 64)), "labels": (torch.int64, (4, 64)), "position_ids": (torch.int64, (4, 64)),
        "segment_ids": (torch.int64, (4, 64)), "loss_mask": (torch.float32, (4, 64)), "sample_ids": (torch.int64, (4,))}


def global_steps(dataset, cfg, consumed, mbs, dp, steps):
    """Per global step (mbs * dp samples): the sample ids and tokens of all DP ranks, rank order."""
    streams = [batches(dataset, consumed, mbs, rank, dp, cfg) for rank in range(dp)]
    out = []
    for _ in range(steps):
        parts = [next(stream) for stream in streams]
        out.append((torch.cat([p["sample_ids"] for p in parts]), torch.cat([p["tokens"] for p in parts])))
    return out


def test_order_same_for_any_dp_and_after_restart(tmp_path, two_prefixes, tokenizer):
    cfg = DataConfig(blend=((0.5, two_prefixes[0]), (0.5, two_prefixes[1])), seq_length=32, split="100,0,0")
    train = build_datasets(cfg, (400, 0, 0), str(tmp_path / "cache"), tokenizer)[0]
    reference = global_steps(train, cfg, 0, 8, 1, 10)
    assert torch.equal(reference[0][0], torch.arange(8)) and torch.equal(reference[9][0], torch.arange(72, 80))
    for mbs, dp in ((4, 2), (2, 4)):
        for (ids, tokens), (ref_ids, ref_tokens) in zip(global_steps(train, cfg, 0, mbs, dp, 10), reference):
            assert torch.equal(ids, ref_ids) and torch.equal(tokens, ref_tokens)
    resumed = global_steps(train, cfg, 6 * 8, 4, 2, 4)  # restart after 6 steps at another DP size
    assert all(torch.equal(a[1], b[1]) for a, b in zip(resumed, reference[6:]))
    assert not torch.equal(resumed[0][1], reference[5][1])  # negative control: off by one step differs
    workers = DataConfig(**{**cfg.__dict__, "num_workers": 2})
    assert all(torch.equal(a[1], b[1]) for a, b in zip(global_steps(train, workers, 0, 4, 2, 3), reference))


def test_interrupted_cache_build_is_rebuilt(tmp_path, shard_prefix, tokenizer):
    cfg = DataConfig(blend=((1.0, shard_prefix),), seq_length=32, split="98,1,1")
    with pytest.raises(ConfigError, match="the valid split of .* gets 0 of its 63 documents"):
        build_datasets(cfg, (300, 20, 20), str(tmp_path / "small"), tokenizer)
    cfg = DataConfig(blend=((1.0, shard_prefix),), seq_length=32, split="90,5,5")
    cache = tmp_path / "cache"
    first = build_datasets(cfg, (300, 20, 20), str(cache), tokenizer)[0]
    shuffle = sorted(cache.glob("*GPTDataset-train-shuffle_index.npy"))[0]
    assert read_manifest(str(cache))[shuffle.name] == shuffle.stat().st_size
    # An interrupted build: a truncated index file and no manifest entry for it.
    shuffle.write_bytes(shuffle.read_bytes()[:100])
    (cache / "gridtrain-cache-manifest.json").unlink()
    with pytest.raises(ValueError):  # negative control: megatron-core alone would trust the file
        np.load(shuffle, mmap_mode="r")
    again = build_datasets(cfg, (300, 20, 20), str(cache), tokenizer)[0]
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(300))


def test_data_index_prebuilds_what_the_trainer_loads(tmp_path, shard_prefix, tokenizer_model, capsys):
    from gridtrain.data.datasets import run_samples
    from gridtrain.launcher.cli import main
    from gridtrain.launcher.config import load_config

    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  blend: [[1.0, {shard_prefix}]]\n  tokenizer: {tokenizer_model}\n  seq_length: 32\n  split: 90,5,5\n"
        f"train:\n  steps: 20\n  global_batch_size: 8\n  micro_batch_size: 2\n  eval_steps: 3\n  run_dir: {tmp_path / 'run'}\n"
        "model:\n  max_seq_len: 32\n")
    assert main(["data", "index", str(config), "--train.steps=30"]) == 0
    assert "ready; samples requested [240, 24, 24]" in capsys.readouterr().out
    cache = tmp_path / "run" / "index-cache"
    before = sorted(os.listdir(cache))
    cfg = load_config([str(config)], ["--train.steps=30"])
    samples = run_samples(cfg.train.steps, cfg.train.global_batch_size, cfg.train.eval_steps)
    train, valid, _ = build_datasets(cfg.data, samples, str(cache), SentencePieceTokenizer(tokenizer_model))
    assert isinstance(train.shuffle_index, np.memmap) and isinstance(valid.shuffle_index, np.memmap)  # loaded, not built
    assert sorted(os.listdir(cache)) == before


def test_multirank_rank0_builds_and_dp_order_matches(tmp_path, two_prefixes, tokenizer_model):
    """2 gloo ranks through torch's elastic agent: rank 0 builds the caches, rank 1 loads them;
    after a simulated resume the DP=2 global batches equal a DP=1 reading."""
    import json
    from pathlib import Path

    from multirank import launch

    worker = Path(__file__).parent / "multirank_data_worker.py"
    out = tmp_path / "result.json"
    launch(worker, 2, [*two_prefixes, tokenizer_model, tmp_path / "cache", out], timeout=240)
    result = json.loads(out.read_text())
    assert result["same"] == [True] * 5 and result["first_ids"] == list(range(16, 24))
    assert result["loaded"] == [[0, 0, 0], [1, 1, 1]]  # rank 0 built in memory, rank 1 memory-mapped its files
    assert result["valid_len"] == 40
