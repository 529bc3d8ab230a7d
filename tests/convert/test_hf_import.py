"""Starting runs from Hugging Face weights: a small randomly initialised GPT-2 built here (no
download), its model section written by `gridtrain convert HF --to gridtrain`, runs started from it
with train.init_from at TP=1 and at TP=2 x PP=2 whose first loss equals transformers' loss on the
same batch, and a bit-exact round trip HF -> gridtrain checkpoint -> HF (the llama family's, five
variants: test_families.py); and bad input, on a Llama with grouped-query attention."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from convert_runs import ENV, RUN_WORKER, first_batch_loss, run_config, train_records
from multirank import launch
from shared_corpus import MODEL_VOCAB

ROUNDTRIP = Path(__file__).parent / "workers" / "init_roundtrip.py"
GRIDTRAIN = [sys.executable, "-m", "gridtrain.launcher.cli"]
LAYOUTS = {"tp1": (1, {}), "tp2pp2": (4, dict(tp=2, pp=2, zero=1))}
LOSS_RTOL = 1e-5


def gridtrain(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDTRAIN, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def hf_model(family: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed({"llama": 1, "gpt2": 2}[family])
    if family == "llama":
        config = LlamaConfig(vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                             rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False, initializer_range=0.1,
                             bos_token_id=1, eos_token_id=2)
        return LlamaForCausalLM(config)
    config = GPT2Config(vocab_size=MODEL_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=96, initializer_range=0.1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, text_corpus) -> dict:
    root = tmp_path_factory.mktemp("hf-import")
    folders = {}
    for family in ("llama", "gpt2"):
        folders[family] = root / family
        hf_model(family).save_pretrained(folders[family])  # safetensors
        shutil.copyfile(text_corpus["tokenizer"], folders[family] / "tokenizer.model")
    return folders


# The llama family's runs from HF weights (five variants, TP=2 x PP=2) and round trips are in
# test_families.py; here gpt2's, and the llama folder serves the bad-input cases.
@pytest.mark.parametrize("family", ["gpt2"])
def test_runs_start_from_hf_weights_at_any_layout(tmp_path, hf_folders, text_corpus, family):
    folder = hf_folders[family]
    written = gridtrain("convert", folder, "--to", "gridtrain", "--out", tmp_path / "from-hf.yaml")
    assert written.returncode == 0, written.stderr[-2000:]
    config = yaml.safe_load((tmp_path / "from-hf.yaml").read_text())
    assert config["train"]["init_from"] == str(folder.resolve())
    assert config["data"]["tokenizer"] == str((folder / "tokenizer.model").resolve())
    model = config["model"]
    assert (model["family"], model["hidden_size"], model["num_layers"], model["vocab_size"]) == (family, 64, 2, MODEL_VOCAB)
    expected = first_batch_loss(family, folder, text_corpus)
    for name, (nproc, layout) in LAYOUTS.items():
        run_dir = tmp_path / name
        cfg = run_config(tmp_path / f"{name}.json", text_corpus, run_dir, model, steps=2, init_from=str(folder), **layout)
        proc = launch(RUN_WORKER, nproc, [cfg], timeout=300)
        assert "initial weights from" in proc.stdout
        losses = [r["loss"] for r in train_records(run_dir)]
        assert abs(losses[0] - expected) <= LOSS_RTOL * expected, (name, losses[0], expected)
        assert abs(losses[1] - expected) > 100 * LOSS_RTOL * expected  # negative control: the next batch's


@pytest.mark.parametrize("family", ["gpt2"])
def test_hf_to_checkpoint_to_hf_is_bit_exact(tmp_path, hf_folders, family):
    proc = subprocess.run([sys.executable, str(ROUNDTRIP), str(hf_folders[family]), str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "roundtrip.json").read_text())
    assert result["exported"] == result["original"] and len(result["exported"]) > 10
    assert result["different"] == []


def test_bad_hf_input_is_one_line_and_exit_2(tmp_path, hf_folders, text_corpus):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(hf_folders["llama"], pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    wide = {**yaml.safe_load(gridtrain_config(hf_folders["llama"], tmp_path))["model"], "hidden_size": 128}
    mismatch = run_config(tmp_path / "mismatch.json", text_corpus, tmp_path / "run", wide, 1,
                          init_from=str(hf_folders["llama"]))
    cases = {
        "pickle without --trust-pickle": (("generate", pickled, "--prompt", "x"), "--trust-pickle"),
        "init_from of other dimensions": (("train", mismatch, "--nproc-per-node", 1),
                                          "model.hidden_size=128: train.init_from="),
    }
    for what, (args, expected) in cases.items():
        proc = gridtrain(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (what, proc.stderr[-2000:])
    trusted = gridtrain("convert", pickled, "--to", "gridtrain", "--out", tmp_path / "ok.yaml")
    assert trusted.returncode == 0  # the config is JSON: no pickle read for it


def gridtrain_config(folder: Path, tmp_path: Path) -> str:
    out = tmp_path / "base.yaml"
    assert gridtrain("convert", folder, "--to", "gridtrain", "--out", out).returncode == 0
    return out.read_text()
