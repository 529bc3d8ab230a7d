"""The shard writer's import of megatron-core (data/shards.py import_builder): in a fresh
interpreter, as `gridtrain preprocess` runs, the builder comes without megatron-core's training
stack, writes the same bytes as with the whole package imported, and the package completes itself
when something later asks it for what its __init__ defines."""
import json
import subprocess
import sys
from importlib.metadata import version

TRAINING_STACK = ("megatron.core.tensor_parallel", "megatron.core.distributed", "megatron.core.optimizer",
                  "megatron.core.transformer")

FRESH_RUN = """
import json, os, sys
from gridtrain.data.preprocess import PreprocessOptions, preprocess
{first}
preprocess(PreprocessOptions(inputs=({corpus!r},), tokenizer={model!r}, output_prefix={prefix!r}), open(os.devnull, "w"))
while_writing = sorted(name for name in {stack!r} if name in sys.modules)
builder = sys.modules["megatron.core.datasets.indexed_dataset"].IndexedDatasetBuilder
import megatron.core
from megatron.core import ModelParallelConfig  # defined by megatron/core/__init__.py
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
print(json.dumps({{"while_writing": while_writing, "version": megatron.core.__version__,
                  "same_builder": builder is IndexedDatasetBuilder, "config": ModelParallelConfig.__name__,
                  "after": sorted(name for name in {stack!r} if name in sys.modules)}}))
"""


def fresh_preprocess(corpus: str, model: str, prefix: str, first: str = "") -> dict:
    code = FRESH_RUN.format(first=first, corpus=corpus, model=model, prefix=prefix, stack=TRAINING_STACK)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def shard_bytes(prefix: str) -> bytes:
    return open(f"{prefix}.bin", "rb").read() + open(f"{prefix}.idx", "rb").read()


def test_builder_imports_alone_writes_the_same_shards_and_the_package_completes(
        tmp_path, corpus_jsonl, tokenizer_model, shard_prefix):
    lite = fresh_preprocess(corpus_jsonl, tokenizer_model, str(tmp_path / "lite"))
    assert lite["while_writing"] == []
    assert shard_bytes(tmp_path / "lite") == shard_bytes(shard_prefix)  # written with the whole package
    assert lite["after"] == sorted(TRAINING_STACK) and lite["same_builder"]
    assert lite["version"] == version("megatron-core") and lite["config"] == "ModelParallelConfig"

    # Control: with megatron.core imported first, the check sees the training stack loaded.
    whole = fresh_preprocess(corpus_jsonl, tokenizer_model, str(tmp_path / "whole"), first="import megatron.core")
    assert whole["while_writing"] == sorted(TRAINING_STACK)
    assert shard_bytes(tmp_path / "whole") == shard_bytes(shard_prefix)
