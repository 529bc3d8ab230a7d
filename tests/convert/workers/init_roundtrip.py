"""HF folder -> gridtrain engine (train.init_from) -> gridtrain checkpoint (the Checkpointer, step 0)
-> HF folder (gridtrain convert's export), then every exported tensor compared bit for bit with the
original's. As a script (test_hf_import.py) it writes OUT/roundtrip.json; family_check.py imports
roundtrip() for the model families.

Usage: init_roundtrip.py HF_DIR OUT_DIR"""
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def tensors(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def roundtrip(hf_dir: Path, out: Path) -> dict:
    """The round trip of `hf_dir` through a checkpoint under `out`; the export is `out/hf`."""
    from gridtrain.convert.hf_config import model_config_from_hf
    from gridtrain.convert.hf_export import export_hf
    from gridtrain.convert.sources import open_weights
    from gridtrain.data.config import DataConfig
    from gridtrain.parallel import groups
    from gridtrain.parallel.config import ParallelConfig
    from gridtrain.train.checkpoint.state import TrainState
    from gridtrain.train.config import TrainConfig
    from gridtrain.train.loop import build_checkpointer, build_engine_of
    from gridtrain.train.run_config import RunConfig

    cfg = RunConfig(model=model_config_from_hf(hf_dir), data=DataConfig(tokenizer=str(hf_dir / "tokenizer.model")),
                    train=TrainConfig(run_dir=str(out / "run"), init_from=str(hf_dir)))
    ctx = groups.initialize_single(ParallelConfig())
    engine = build_engine_of(cfg, ctx, open_weights=open_weights)
    saved = build_checkpointer(cfg, ctx.layout).save(engine, TrainState(step=0))
    groups.destroy(world=False)
    source = open_weights(saved.path)
    export_hf(source, out / "hf", "fp32", 5 * 10**9, force=False, tokenizer=source.tokenizer)
    original, exported = tensors(hf_dir), tensors(out / "hf")
    return {"family": dataclasses.asdict(cfg.model)["family"], "exported": sorted(exported),
            "original": sorted(original), "different": sorted(n for n in exported if n in original and not
                                                               torch.equal(exported[n], original[n]))}


if __name__ == "__main__":
    hf, target = Path(sys.argv[1]), Path(sys.argv[2])
    (target / "roundtrip.json").write_text(json.dumps(roundtrip(hf, target)))
