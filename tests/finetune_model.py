"""A tiny Qwen2 model in a Hugging Face folder with the session's ChatML tokenizer: what the
fine-tuning tests start from (train.init_from). A uniquely named module: tests/ folders are not
packages."""
import dataclasses
import shutil
from pathlib import Path

import torch

from gridtrain.data.tokenizer import HF_FILES


def tiny_qwen2(tokenizer_folder: Path, folder: Path, hidden: int = 64, seed: int = 0) -> dict:
    """Save random Qwen2 weights and the tokenizer into `folder`; returns the model section
    `gridtrain convert --to gridtrain` gives for it."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from gridtrain.convert.hf_config import model_config_from_hf

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, tie_word_embeddings=False, use_sliding_window=False,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in HF_FILES:
        if (tokenizer_folder / name).is_file():
            shutil.copyfile(tokenizer_folder / name, folder / name)
    return dataclasses.asdict(model_config_from_hf(folder))
