"""Worker for test_families.py, one process: for each reduced HF model of a family, gridtrain's
logits (a one-rank Decoder of the folder's weights, as `gridtrain generate` builds it) against
transformers' on random ids longer than the family's original context; greedy generation of 32
tokens by both; a negative control per option (the same weights in a Decoder with that option
turned off); the round trip HF -> gridtrain checkpoint -> HF, whose export transformers loads
with the original's config fields and logits; and the f32 GGUF export in llama.cpp itself (logits
and greedy continuation). Writes one JSON file.

Usage: family_check.py PLAN.json OUT.json WORK_DIR
(PLAN: {name: {"folder": HF_DIR, "off": {ModelConfig field: the value that turns it off}}})"""
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))  # init_roundtrip
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for llamacpp

import llamacpp  # noqa: E402
from init_roundtrip import roundtrip  # noqa: E402

LENGTH = 64
CONFIG_FIELDS = ("model_type", "architectures", "head_dim", "num_key_value_heads", "tie_word_embeddings",
                 "attention_bias", "mlp_bias", "rope_parameters", "sliding_window", "use_sliding_window")


def decoder_of(source, cfg):
    """A one-rank fp32 Decoder of `cfg` holding `source`'s weights (those cfg has)."""
    from gridtrain.convert.generate import load_decoder

    view = copy.copy(source)
    view.model = cfg
    return load_decoder(view, "cpu")


def logits(model_or_decoder, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if hasattr(model_or_decoder, "cfg"):
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            return model_or_decoder(tokens, positions, torch.zeros_like(tokens))[..., :model_or_decoder.cfg.vocab_size]
        return model_or_decoder(tokens).logits


def batches(vocab: int) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (2, LENGTH), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def gap(a, b, vocab: int) -> float:
    return max((logits(a, t) - logits(b, t)).abs().max().item() for t in batches(vocab))


def config_fields(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    fields = {k: config.get(k) for k in CONFIG_FIELDS}
    fields["head_dim"] = fields["head_dim"] or config["hidden_size"] // config["num_attention_heads"]  # as read
    return fields


def check_gguf(source, decoder, prompt: list[int], ours: list[int], path: Path) -> dict:
    """The f32 GGUF export of `source` in llama.cpp against gridtrain's `decoder`."""
    from gridtrain.convert.gguf_export import export_gguf

    llm = llamacpp.load(export_gguf(source, path, "f32", force=False))
    vocab = source.model.vocab_size
    gap = max(float(np.abs(llamacpp.logits(llm, t[0].tolist()) - logits(decoder, t[:1])[0].numpy()).max())
              for t in batches(vocab))
    result = {"gguf_gap": gap, "gguf_greedy": llamacpp.greedy(llm, prompt, len(ours))}
    llm.close()
    return result


def check_one(hf_dir: Path, options: dict, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from gridtrain.convert.sources import open_weights
    from gridtrain.model.generation import Sampling, generate
    from gridtrain.parallel import groups

    source = open_weights(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    vocab = source.model.vocab_size
    decoder = decoder_of(source, source.model)
    scale = max(logits(model, t).abs().max().item() for t in batches(vocab))
    result = {"model": dataclasses.asdict(source.model), "gap": gap(decoder, model, vocab), "scale": scale,
              "hf_class": type(model).__name__}
    prompt = batches(vocab)[0][0, :40].tolist()
    result["ours"] = generate(decoder, [prompt], Sampling(max_new_tokens=32), stop_ids=())[0]
    model.generation_config.eos_token_id = None  # 32 tokens from both, whatever they are
    result["theirs"] = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, 40:].tolist()
    if not llamacpp.available():
        result.update(check_gguf(source, decoder, prompt, result["ours"], work / "f32.gguf"))
    groups.destroy(world=False)
    result["off"] = {}
    for field, value in options.items():
        off = decoder_of(source, dataclasses.replace(source.model, **{field: value}))
        result["off"][field] = gap(off, model, vocab)
        groups.destroy(world=False)
    result["roundtrip"] = roundtrip(hf_dir, work)
    exported = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    result["exported_gap"] = gap(exported, model, vocab)
    result["exported_class"] = type(exported).__name__
    result["configs"] = [config_fields(hf_dir), config_fields(work / "hf")]
    return result


def main() -> None:
    plan, out, work = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), Path(sys.argv[3])
    results = {name: check_one(Path(spec["folder"]), spec["off"], work / name) for name, spec in plan.items()}
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
