"""Worker for test_hf_tokenizer_flow.py, one process with transformers: the exported folder's
tokenizer against the source folder's on the hard text set, transformers' greedy continuation of a
prompt from the export, and the GGUF file in llama.cpp itself (logits against the export, token ids
against the source tokenizer, the greedy continuation of the prompt) and gguf's reader. Writes one
JSON file.

Usage: hf_flow_check.py OUT.json SOURCE_HF EXPORT_HF FILE.gguf PROMPT"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for hf_tokenizers
import llamacpp  # noqa: E402
from hf_tokenizers import HARD_TEXTS  # noqa: E402


def main(out: Path, source: str, export: str, gguf_path: Path, prompt: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(source, split_special_tokens=True)
    exported = AutoTokenizer.from_pretrained(export, split_special_tokens=True)
    result = {"tokenizer_class": type(exported).__name__, "files": sorted(p.name for p in Path(export).iterdir()),
              "tokenizer_mismatches": [t for t in HARD_TEXTS if exported(t).input_ids != theirs(t).input_ids]}
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = exported(prompt, return_tensors="pt").input_ids
    # Among the tokenizer's ids only, as gridtrain generates (the model has more rows than tokens).
    beyond = list(range(len(exported), model.config.vocab_size))
    new = model.generate(ids, max_new_tokens=24, do_sample=False, suppress_tokens=beyond)[0, ids.shape[1]:].tolist()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    kept = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    result.update(greedy_ids=new, stop_ids=sorted(stops), greedy_text=exported.decode(kept))
    if llamacpp.available() is None:
        result.update(check_gguf(gguf_path, theirs, model, ids[0].tolist(), new, prompt, len(exported)))
    out.write_text(json.dumps(result))


def check_gguf(gguf_path: Path, theirs, model, ids: list[int], new: list[int], prompt: str, tokens: int) -> dict:
    from gguf import GGUFReader

    result = {}
    llm = llamacpp.load(gguf_path)
    result["gguf_tokenizer_mismatches"] = [
        t for t in HARD_TEXTS if llamacpp.tokenize(llm, t) != theirs(t, add_special_tokens=False).input_ids]
    result["gguf_prompt_ids"] = llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
    result["gguf_greedy"] = llamacpp.greedy(llm, ids, len(new), tokens)
    gap = scale = 0.0
    for seed in range(2):
        tokens = torch.randint(0, len(theirs), (40,), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = model(tokens[None]).logits[0].numpy()
        gap = max(gap, float(np.abs(llamacpp.logits(llm, tokens.tolist()) - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    llm.close()
    # transformers' GGUF loader too: the same tokenizer (text without special-token strings, which
    # it matches) and logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).eval()
    gguf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    plain = [t for t in HARD_TEXTS if "<" not in t]
    result["transformers_gguf_mismatches"] = [
        t for t in plain if gguf_tok(t, add_special_tokens=False).input_ids != theirs(t, add_special_tokens=False).input_ids]
    tokens = torch.randint(0, len(theirs), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result["transformers_gguf_gap"] = (loaded(tokens).logits - model(tokens).logits).abs().max().item()
    reader = GGUFReader(str(gguf_path))
    result.update(gguf_gap=gap, scale=scale, gguf_pre=reader.fields["tokenizer.ggml.pre"].contents(),
                  gguf_model=reader.fields["tokenizer.ggml.model"].contents())
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5])
