"""`gridtrain demo` pieces that do not need a training run (the full demo is run by `make demo`):
the corpus is the standard library without site-packages, and the run config it writes on top of
the tiny-llama preset is valid for its TP x PP x DP layout."""
import json
import sysconfig
from pathlib import Path

import pytest

from gridtrain.errors import UserError
from gridtrain.launcher.demo import CPU_LAYOUT, build_corpus, parse_layout, preset_path, stdlib_files, write_run_config


def test_corpus_is_stdlib_without_site_packages(tmp_path):
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files()
    assert len(files) > 500 and all(str(f).startswith(root) for f in files)
    assert not [f for f in files if "site-packages" in f.parts or "dist-packages" in f.parts]
    assert any(f.name == "json" or f.parent.name == "json" for f in files)
    info = build_corpus(tmp_path / "corpus.jsonl")
    lines = (tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    assert info["documents"] == len(lines) and info["bytes"] > 20_000_000
    first = json.loads(lines[0])
    assert Path(first["path"]).read_text(encoding="utf-8") == first["text"]


def test_run_config_valid_for_the_layout(tmp_path):
    from gridtrain.launcher.config import load_config
    from gridtrain.launcher.validate import validate

    path = write_run_config(tmp_path, CPU_LAYOUT, 100, 8000)
    cfg = load_config([str(preset_path()), str(path)])
    tp, pp, dp = CPU_LAYOUT
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.data_parallel) == (tp, pp, dp)
    assert tp > 1 and pp > 1 and dp > 1 and cfg.parallel.zero_stage <= 1
    assert cfg.data.blend[0][1] == str(tmp_path / "data" / "corpus_text_document") and cfg.train.steps == 100
    validate(cfg, tp * pp * dp, "cpu")
    with pytest.raises(UserError, match="--layout='2,2'"):
        parse_layout("2,2")
