"""The published model families, each as a reduced model transformers builds from a config with
that family's real options (random weights, random biases and norm weights so none is a no-op;
2 layers, 6 query heads over 2 kv heads): Llama 3.1/3.2 (llama3 rope scaling, attention and MLP
biases), a tied Llama with linear rope scaling (SmolLM2's tie), Qwen 2.5 (q/k/v biases, tied), Qwen 3
(q/k norms, head_dim 32 apart from hidden/heads 16) and Mistral. For each: `convert --to gridtrain`,
then in one worker process gridtrain's logits against transformers' on sequences longer than the
llama3 model's original context, greedy generation of 32 tokens, a negative control per option,
HF -> gridtrain checkpoint -> HF bit-exact with transformers loading the export, and the f32 GGUF
export in llama.cpp (logits, greedy tokens); and in one 4-rank launch per family, the first
training loss at TP=2 x PP=2 against transformers' loss."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from convert_runs import ENV, RUN_WORKER, first_batch_loss, run_config, train_records
from llamacpp import available as llamacpp_missing
from multirank import launch
from shared_corpus import MODEL_VOCAB

WORKER = Path(__file__).parent / "workers" / "family_check.py"
GRIDTRAIN = [sys.executable, "-m", "gridtrain.launcher.cli"]
TOLERANCE = 1e-5  # fp32 logits and losses, as the issue asks
SHAPE = dict(vocab_size=MODEL_VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
             initializer_range=0.1, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # family_check reads 64 positions
# name: (transformers config class, its options, the ModelConfig fields that turn each option off)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True,
                                   tie_word_embeddings=False),
               {"rope_scaling": "none", "qkv_bias": False, "attn_out_bias": False, "mlp_bias": False}),
    "llama-tied": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 100000.0, "factor": 2.0},
                                       tie_word_embeddings=True),
                   {"rope_scaling": "none"}),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                  tie_word_embeddings=True, use_sliding_window=False),
              {"qkv_bias": False}),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                  tie_word_embeddings=False, use_sliding_window=False),
              {"qk_norm": False}),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), {}),
}


def gridtrain(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDTRAIN, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def hf_model(name: str):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, options, _ = FAMILIES[name]
    torch.manual_seed(sorted(FAMILIES).index(name))
    model = AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**SHAPE, **options))
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1: make every one count
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in param_name:
                param.normal_(1.0, 0.3)
    return model


@pytest.fixture(scope="module")
def families(tmp_path_factory, text_corpus) -> dict:
    """name -> (HF folder, its model section as `convert --to gridtrain` wrote it)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILIES:
        folder = root / name
        hf_model(name).save_pretrained(folder)
        shutil.copyfile(text_corpus["tokenizer"], folder / "tokenizer.model")
        converted = gridtrain("convert", folder, "--to", "gridtrain", "--out", root / f"{name}.yaml")
        assert converted.returncode == 0, (name, converted.stderr[-2000:])
        out[name] = folder, yaml.safe_load((root / f"{name}.yaml").read_text())["model"]
    return out


def test_converted_sections_carry_each_option(families):
    sections = {name: model for name, (_, model) in families.items()}
    assert {k: sections["llama3"][k] for k in ("rope_scaling", "rope_factor", "rope_original_max_positions",
                                               "qkv_bias", "attn_out_bias", "mlp_bias", "tie_embeddings")} == \
        {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_positions": 32, "qkv_bias": True,
         "attn_out_bias": True, "mlp_bias": True, "tie_embeddings": False}
    assert (sections["llama-tied"]["rope_scaling"], sections["llama-tied"]["tie_embeddings"]) == ("linear", True)
    assert (sections["qwen2"]["qkv_bias"], sections["qwen2"]["attn_out_bias"]) == (True, False)
    assert (sections["qwen3"]["qk_norm"], sections["qwen3"]["head_dim"]) == (True, 32)
    assert {s["hf_model_type"] for s in sections.values()} == {"llama", "qwen2", "qwen3", "mistral"}


def test_logits_generation_and_export_match_transformers(tmp_path, families):
    plan = {name: {"folder": str(folder), "off": FAMILIES[name][2]} for name, (folder, _) in families.items()}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "plan.json"), str(tmp_path / "out.json"),
                           str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "out.json").read_text())
    for name, r in results.items():
        assert r["scale"] > 1.0, name  # logits of a real spread, so the tolerance means something
        assert r["gap"] <= TOLERANCE, (name, r["gap"])
        assert r["ours"] == r["theirs"] and len(r["ours"]) == 32, name
        for option, off_gap in r["off"].items():  # negative controls: each option matters
            assert off_gap > 1000 * TOLERANCE, (name, option, off_gap)
        trip = r["roundtrip"]
        assert trip["exported"] == trip["original"] and trip["different"] == [], (name, trip)
        assert r["exported_gap"] == 0.0 and r["exported_class"] == r["hf_class"], name
        original, exported = r["configs"]
        assert exported == original, name
        if not llamacpp_missing():  # llama.cpp itself runs the f32 GGUF export of every family
            assert r["gguf_gap"] <= TOLERANCE and r["gguf_greedy"] == r["ours"], (name, r["gguf_gap"])
    assert set(results["llama3"]["off"]) == {"rope_scaling", "qkv_bias", "attn_out_bias", "mlp_bias"}


# The families whose options change how weights split over TP ranks and PP stages: llama3 (q/k/v, o
# and MLP biases), llama-tied (the embedding tied across the first and last stage), qwen3 (q/k
# norms replicated over TP, head_dim apart from hidden / heads). qwen2 (tied, q/k/v biases) and
# mistral (none) add no option of their own; all five match transformers at one rank above.
@pytest.mark.parametrize("name", ["llama3", "llama-tied", "qwen3"])
def test_first_loss_at_tp2_pp2_equals_transformers(tmp_path, families, text_corpus, name):
    folder, model = families[name]
    expected = first_batch_loss(name, folder, text_corpus)
    run_dir = tmp_path / "run"
    cfg = run_config(tmp_path / "run.json", text_corpus, run_dir, model, steps=2, init_from=str(folder), tp=2, pp=2)
    launch(RUN_WORKER, 4, [cfg], timeout=300)
    losses = [r["loss"] for r in train_records(run_dir)]
    assert abs(losses[0] - expected) <= TOLERANCE * expected, (losses[0], expected)
    assert abs(losses[1] - expected) > 100 * TOLERANCE * expected  # negative control: the next batch's


def write_folder(root: Path, name: str, base: Path, **changes) -> Path:
    """A copy of `base` whose config.json has `changes` (a None value removes the field)."""
    folder = root / name
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


def test_hub_style_rope_scaling_reads_as_rope_parameters(tmp_path, families):
    """Llama 3.2's published config.json (transformers 4) has rope_theta and rope_scaling."""
    from gridtrain.convert.hf_config import model_config_from_hf

    base = families["llama3"][0]
    old = {**{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}, "rope_type": "llama3"}
    hub = write_folder(tmp_path, "hub", base, rope_parameters=None, rope_scaling=old, rope_theta=10000.0)
    assert model_config_from_hf(hub) == model_config_from_hf(base)


def test_bad_family_input_is_one_line_and_exit_2(tmp_path, families, text_corpus):
    mistral, llama3 = families["mistral"][0], families["llama3"][0]
    rope = {**LLAMA3_ROPE}
    cases = {
        "unsupported model_type": (write_folder(tmp_path, "phi", mistral, model_type="phi3"), "model_type='phi3'"),
        "yarn": (write_folder(tmp_path, "yarn", llama3, rope_parameters={**rope, "rope_type": "yarn"}),
                 "rope_parameters.rope_type='yarn'"),
        "dynamic": (write_folder(tmp_path, "dynamic", llama3, rope_parameters={**rope, "rope_type": "dynamic"}),
                    "rope_parameters.rope_type='dynamic'"),
        "sliding window": (write_folder(tmp_path, "window", mistral, sliding_window=16), "sliding_window=16"),
    }
    for what, (folder, expected) in cases.items():
        proc = gridtrain("convert", folder, "--to", "gridtrain", "--out", tmp_path / f"{folder.name}.yaml")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (what, proc.stderr[-2000:])
        assert not (tmp_path / f"{folder.name}.yaml").exists()
    model = families["qwen3"][1]
    layouts = {"kv heads over TP": ({**model}, 4, "model.num_kv_heads=2"),
               "odd head_dim": ({**model, "head_dim": 33}, 1, "model.head_dim=33")}
    for what, (section, tp, expected) in layouts.items():
        cfg = run_config(tmp_path / "bad.json", text_corpus, tmp_path / "run", section, 1, tp=tp)
        proc = gridtrain("train", cfg, "--nproc-per-node", tp, "--dry-run")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (what, proc.stderr[-2000:])
