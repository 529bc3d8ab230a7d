"""Preprocessing: round trip through megatron-core's reader, byte-identity across worker counts,
input formats, sharding, bad input and interrupted runs."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset
from shared_corpus import write_jsonl

from gridtrain.data.preprocess import PreprocessOptions, preprocess
from gridtrain.data.tokenizer import SentencePieceTokenizer
from gridtrain.errors import UserError

QUIET = open(os.devnull, "w")


def run(inputs, tokenizer, prefix, **kwargs) -> dict:
    return preprocess(PreprocessOptions(inputs=tuple(inputs), tokenizer=tokenizer, output_prefix=str(prefix), **kwargs), QUIET)


def read_docs(prefix) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def expected_ids(model, docs) -> list[list[int]]:
    """SentencePiece's own ids of each document, then the tokenizer's eod."""
    sp = spm.SentencePieceProcessor(model_file=model)
    eod = SentencePieceTokenizer(model).eod
    return [ids + [eod] for ids in sp.encode(docs, out_type=int)]


def read_bytes(prefix) -> bytes:
    return open(f"{prefix}.bin", "rb").read() + open(f"{prefix}.idx", "rb").read()


def test_round_trip_identical_for_any_worker_count(tmp_path, corpus_docs, corpus_jsonl, tokenizer_model, shard_prefix):
    expected = expected_ids(tokenizer_model, corpus_docs)
    assert read_docs(shard_prefix) == expected
    dataset = IndexedDataset(shard_prefix)
    assert dataset.index.dtype == np.uint16 and len(dataset.document_indices) == len(corpus_docs) + 1
    summary = run([corpus_jsonl], tokenizer_model, tmp_path / "w3", workers=3)
    assert read_bytes(tmp_path / "w3") == read_bytes(shard_prefix)
    assert summary["documents"] == len(corpus_docs) and summary["tokens"] == sum(map(len, expected))
    on_disk = json.load(open(tmp_path / "w3.summary.json"))
    assert on_disk["documents"] == len(corpus_docs) and on_disk["shards"][0]["prefix"] == str(tmp_path / "w3")
    # Negative control: one changed document changes the output.
    changed = write_jsonl(tmp_path / "changed.jsonl", corpus_docs[:-1] + [corpus_docs[-1] + "!"])
    run([changed], tokenizer_model, tmp_path / "changed", workers=3)
    assert read_bytes(tmp_path / "changed") != read_bytes(shard_prefix)


def test_formats_gzip_txt_blocks_and_shards(tmp_path, corpus_docs, tokenizer_model, shard_prefix):
    docs = corpus_docs[:8]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs)
    run([str(tmp_path / "a.jsonl.gz")], tokenizer_model, tmp_path / "gz", json_key="body")
    assert read_docs(tmp_path / "gz") == expected_ids(tokenizer_model, docs)

    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, doc in enumerate(docs):
        (txt_dir / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    run([str(txt_dir)], tokenizer_model, tmp_path / "files", workers=2)
    assert read_docs(tmp_path / "files") == expected_ids(tokenizer_model, docs)

    (tmp_path / "blocks.txt").write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird", encoding="utf-8")
    run([str(tmp_path / "blocks.txt")], tokenizer_model, tmp_path / "blocks", txt_mode="blocks")
    assert read_docs(tmp_path / "blocks") == expected_ids(tokenizer_model, ["first doc\nline two", "second doc", "third"])

    summary = run([str(tmp_path / "a.jsonl.gz")], tokenizer_model, tmp_path / "sh", json_key="body", shard_size_tokens=3000)
    prefixes = [s["prefix"] for s in summary["shards"]]
    assert len(prefixes) >= 2 and all(IndexedDataset.exists(p) for p in prefixes)
    assert [d for p in prefixes for d in read_docs(p)] == read_docs(tmp_path / "gz")


def test_part_slices_inputs(tmp_path, corpus_docs, tokenizer_model):
    files = [write_jsonl(tmp_path / f"in{i}.jsonl", [doc]) for i, doc in enumerate(corpus_docs[:5])]
    parts = [run([str(tmp_path / "in*.jsonl")], tokenizer_model, tmp_path / "p", part=f"{i}/2") for i in range(2)]
    got = [d for s in parts for d in read_docs(s["shards"][0]["prefix"])]
    assert got == expected_ids(tokenizer_model, corpus_docs[:5]) and len(files) == 5
    assert [s["documents"] for s in parts] == [2, 3]


def bad_input(tmp_path) -> str:
    lines = [b'{"text": "good one"}', b'{"text": broken', b'{"other": "x"}', b'{"text": "bad \xff\xfe bytes"}',
             b'{"text": "   "}', b'{"text": "\\ud800 lone surrogate"}', b'{"text": "good two"}', b"", b'["not", "an object"]']
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_bad_records_counted_with_line_numbers(tmp_path, tokenizer_model):
    path = bad_input(tmp_path)
    summary = run([path], tokenizer_model, tmp_path / "ok", max_bad_fraction=0.9)
    bad = {reason: entry["count"] for reason, entry in summary["bad"].items()}
    assert bad == {"invalid-json": 1, "missing-key": 2, "non-utf8": 2}
    assert summary["empty_documents"] == {"count": 1, "first": [f"{path}:5"]}  # skipped, not an error
    assert summary["bad"]["missing-key"]["first"] == [f"{path}:3", f"{path}:9"]
    assert summary["bad"]["non-utf8"]["first"] == [f"{path}:4", f"{path}:6"]
    assert summary["documents"] == 2 and summary["records"] == 8
    assert read_docs(tmp_path / "ok") == expected_ids(tokenizer_model, ["good one", "good two"])

    with pytest.raises(UserError, match=r"5 of 8 records .*invalid-json: 1 \(first at .*bad.jsonl:2\)"):
        run([path], tokenizer_model, tmp_path / "strict")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "ok.bin", "ok.idx", "ok.summary.json"]


def test_empty_documents_are_skipped_not_errors(tmp_path, tokenizer_model):
    """A source corpus has empty files: they are counted and skipped under the default 1% limit,
    which a single malformed record among as few documents still exceeds."""
    docs = ["first document"] + [""] * 3 + ["  \n\t "] + ["another document", "a third one"]
    path = write_jsonl(tmp_path / "sparse.jsonl", docs)
    summary = run([path], tokenizer_model, tmp_path / "sparse")
    assert summary["documents"] == 3 and summary["empty_documents"]["count"] == 4 and summary["bad"] == {}
    assert read_docs(tmp_path / "sparse") == expected_ids(tokenizer_model, [docs[0], docs[5], docs[6]])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(open(path).read() + "{not json\n")
    with pytest.raises(UserError, match="1 of 8 records"):
        run([str(broken)], tokenizer_model, tmp_path / "broken")


def test_cli_errors_are_one_line(tmp_path, tokenizer_model, capsys):
    from gridtrain.launcher.cli import main

    cli = ["preprocess", "--tokenizer", tokenizer_model, "--output-prefix", str(tmp_path / "x"), "--input"]
    for args, message in [([bad_input(tmp_path)], "--max-bad-fraction=0.01"), ([str(tmp_path / "none*.jsonl")], "matched no file")]:
        assert main(cli + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("gridtrain: error: ") and message in err[-1] and "Traceback" not in "".join(err)


def test_failed_run_removes_partial_files(tmp_path, corpus_docs, tokenizer_model, monkeypatch):
    """A corrupt gzip fails after several chunks were written: a UserError names the file and
    nothing of the run is left."""
    from gridtrain.data import preprocess as module

    # Write from the first chunk on, not after 64 MB (or 4 chunks per worker) are queued ahead.
    monkeypatch.setattr(module, "AHEAD_BYTES", 0)
    monkeypatch.setattr(module, "IN_FLIGHT_PER_WORKER", 1)
    data = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs * 4).encode())
    (tmp_path / "in" ).mkdir()
    (tmp_path / "in" / "corrupt.jsonl.gz").write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(UserError, match="corrupt.jsonl.gz: unreadable"):
        run([str(tmp_path / "in")], tokenizer_model, tmp_path / "out" / "c", shard_size_tokens=20_000)
    assert os.listdir(tmp_path / "out") == []


def test_killed_run_leaves_no_complete_pair(tmp_path, corpus_docs, tokenizer_model):
    big = write_jsonl(tmp_path / "big.jsonl", corpus_docs * 40)
    prefix = tmp_path / "out" / "big"
    cmd = [sys.executable, "-m", "gridtrain.launcher.cli", "preprocess", "--input", big, "--tokenizer",
           tokenizer_model, "--output-prefix", str(prefix), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(f"{prefix}.bin.partial") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "preprocess finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # No cleanup can run after SIGKILL, yet nothing looks like a finished pair or summary.
    assert not IndexedDataset.exists(str(prefix)) and not os.path.exists(f"{prefix}.summary.json")
    assert os.listdir(prefix.parent) == ["big.bin.partial"]
