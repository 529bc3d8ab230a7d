"""`gridtrain convert HF_DIR --to gridtrain --out CONFIG.yaml`: the model section of a Hugging Face
folder, with train.init_from set to it (and data.tokenizer when the folder has a SentencePiece
tokenizer.model), so a run starts from those weights without transcribing dimensions by hand."""
import dataclasses
from pathlib import Path

import yaml

from gridtrain.convert.hf_config import model_config_from_hf
from gridtrain.convert.output import check_target
from gridtrain.errors import UserError


def config_from_hf(folder: Path) -> dict:
    model = model_config_from_hf(folder)
    section = {key: value for key, value in dataclasses.asdict(model).items()
               if key not in ("init_std", "activation_checkpointing")}
    config = {"model": section, "train": {"init_from": str(folder.resolve())}}
    if (folder / "tokenizer.model").exists():
        config["data"] = {"tokenizer": str((folder / "tokenizer.model").resolve())}
    return config


def write_config_from_hf(folder: Path, out: Path, force: bool) -> Path:
    if not (folder / "config.json").exists():
        raise UserError(f"--to gridtrain: {folder} is not a Hugging Face model folder (no config.json)")
    config = config_from_hf(folder)
    check_target(out, force)
    header = (f"# From {folder.resolve()}: the model section of its config.json; training starts from its\n"
              "# weights (train.init_from). Add a parallel layout, data and train sections, or include this file.\n")
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    tmp.replace(out)
    return out
