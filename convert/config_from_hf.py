"""`gridtrain convert HF_DIR --to gridtrain --out CONFIG.yaml`: the model section of a Hugging Face
folder, with train.init_from set to it (and data.tokenizer set to the folder when it holds a
tokenizer of any kind gridtrain reads), so a run starts from those weights, with their tokenizer,
without transcribing dimensions by hand."""
import dataclasses
from pathlib import Path

import yaml

from gridtrain.convert.hf_config import model_config_from_hf
from gridtrain.convert.output import check_export
from gridtrain.convert.source_config import hf_weights_problem
from gridtrain.data.tokenizer import find_tokenizer
from gridtrain.errors import UserError


def config_from_hf(folder: Path) -> dict:
    model = model_config_from_hf(folder)
    section = {key: value for key, value in dataclasses.asdict(model).items()
               if key not in ("init_std", "activation_checkpointing")}
    config = {"model": section, "train": {"init_from": str(folder.resolve())}}
    tokenizer = find_tokenizer(folder)
    if tokenizer is not None:
        config["data"] = {"tokenizer": str(Path(tokenizer).resolve())}
    return config


def write_config_from_hf(folder: Path, out: Path, force: bool) -> Path:
    if not (folder / "config.json").exists():
        raise UserError(f"--to gridtrain: {folder} is not a Hugging Face model folder (no config.json)")
    config = config_from_hf(folder)  # what config.json describes is refused first, then missing weights
    problem = hf_weights_problem(folder)
    if problem:
        raise UserError(f"--to gridtrain: {problem}")
    check_export(out, "gridtrain", force, sources=(folder,))
    header = (f"# From {folder.resolve()}: the model section of its config.json; training starts from its\n"
              "# weights (train.init_from). Add a parallel layout, data and train sections, or include this file.\n")
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    tmp.replace(out)
    return out
