"""Hugging Face tokenizer folders the tests need, built here with the `tokenizers` library (no hub
downloads; a uniquely named module: tests/ folders are not packages). One byte-level BPE is trained
on the session corpus for each of four published pre-tokenizer families, and saved as those
models ship their folders:

- gpt2:   GPT-2's ByteLevel pre-tokenizer; <|endoftext|> is bos, eos and unk; no BOS added (GPT-2,
          SmolLM2 and Qwen base models add none).
- llama3: Llama 3's split regex then ByteLevel; <|begin_of_text|> added by the post-processor,
          <|end_of_text|> eos; <|start_header_id|>, <|end_header_id|>, <|eot_id|> and Llama 3's chat
          template.
- qwen2:  Qwen2's split regex (digits one by one) then ByteLevel; <|endoftext|> eos, <|im_start|>,
          <|im_end|> and a ChatML template; no BOS.
- smollm2: SmolLM2's Digits (one by one) then GPT-2's ByteLevel; <|endoftext|> bos and eos,
          <|im_start|>, <|im_end|> and a ChatML template; no BOS added.

The regexes are the ones the published tokenizer.json files hold (and llama.cpp's llama-vocab.cpp
for `gpt-2`, `llama-bpe` and `qwen2`)."""
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
CHATML_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

FAMILIES = {
    "gpt2": {"split": None, "specials": ["<|endoftext|>"],
             "config": {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}},
    "llama3": {"split": LLAMA3_SPLIT, "bos": "<|begin_of_text|>",
               "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"],
               "config": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                          "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE}},
    "qwen2": {"split": QWEN2_SPLIT, "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "config": {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>",
                         "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}},
    "smollm2": {"split": None, "digits": True, "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "config": {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                           "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                           "chat_template": CHATML_TEMPLATE}},
}


def build_tokenizer(family: str, texts: list[str], vocab_size: int) -> Tokenizer:
    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec["split"] is None)
    if spec.get("digits"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif spec["split"] is None:
        tok.pre_tokenizer = byte_level
    else:
        split = pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]])
    if "bos" in spec:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save_folder(family: str, texts: list[str], folder: Path, vocab_size: int = 600) -> Path:
    """An HF tokenizer folder (tokenizer.json, tokenizer_config.json) of `family`."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(family, texts, vocab_size).save(str(folder / "tokenizer.json"))
    config = {**FAMILIES[family]["config"], "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# Text that tells tokenizers apart: leading, trailing and repeated spaces, tabs, newlines,
# unicode and emoji, digits, code, and the special-token strings themselves inside text.
HARD_TEXTS = [
    "hello world", " leading space", "trailing space ", "two  spaces   three", "\ttab\tand\t\ttabs",
    "line one\nline two\n\nblank above\r\nwindows", "", " ", "\n", "héllo wörld — naïve café", "日本語のテキスト",
    "emoji 🚀🦙 and 😶\u200d🌫️", "3 33 333 3333 12345678 3.14", "def main(argv):\n    return 0x1F  # done",
    "I've been 'told he's there, 'RE you sure?", "literal <|endoftext|> and <|im_end|> and <|begin_of_text|> in text",
    "<eod></s><s> and <|eot_id|>", "ǅ 𝔘 \u00a0nbsp", "a" * 300,
]
