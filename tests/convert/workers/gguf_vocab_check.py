"""Worker for test_hf_tokenizer_flow.py, one process: each HF folder (a tiny model with a byte-level
BPE tokenizer of one published family) exported to GGUF by gridtrain, its vocabulary loaded by
llama.cpp, and llama.cpp's ids of the hard text set compared with AutoTokenizer's; as a negative
control, the same file written under another family's pre-tokenizer name. Writes one JSON file.

Usage: gguf_vocab_check.py OUT.json WORK_DIR NAME=HF_DIR ..."""
import json
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/
import llamacpp  # noqa: E402
from hf_tokenizers import HARD_TEXTS  # noqa: E402

CONTROL_NAMES = {"gpt-2": "llama-bpe", "llama-bpe": "gpt-2", "qwen2": "gpt-2", "smollm": "llama-bpe"}


def mismatches(gguf_path: Path, theirs) -> list[str]:
    llm = llamacpp.load(gguf_path, vocab_only=True)
    wrong = [t for t in HARD_TEXTS if llamacpp.tokenize(llm, t) != theirs(t, add_special_tokens=False).input_ids]
    llm.close()
    return wrong


def check_one(folder: Path, work: Path) -> dict:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from gridtrain.convert import gguf_vocab
    from gridtrain.convert.gguf_export import export_gguf
    from gridtrain.convert.sources import open_weights

    theirs = AutoTokenizer.from_pretrained(folder, split_special_tokens=True)
    path = export_gguf(open_weights(folder), work / "vocab.gguf", "f32", force=False)
    pre = GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents()
    other = CONTROL_NAMES[pre]  # negative control: the name of a family that splits the hard texts otherwise
    with mock.patch.object(gguf_vocab, "llama_cpp_pre", lambda _: other):
        control = export_gguf(open_weights(folder), work / "control.gguf", "f32", force=False)
    return {"pre": pre, "mismatches": mismatches(path, theirs), "control_mismatches": mismatches(control, theirs)}


def main() -> None:
    out, work = Path(sys.argv[1]), Path(sys.argv[2])
    results = {}
    for spec in sys.argv[3:]:
        name, folder = spec.split("=", 1)
        results[name] = check_one(Path(folder), work / name)
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
