"""A published-style model end to end with no SentencePiece anywhere: a Llama-3-like Hugging Face
folder (byte-level BPE that adds BOS, a LlamaForCausalLM made by transformers with random weights)
is converted (`convert --to gridtrain` names its tokenizer), its tokenizer preprocesses text (shards
equal transformers' ids + eod, the same bytes for 1 and 2 workers), TP=2 x PP=2 trains from its
weights, `gridtrain generate` continues a prompt exactly as transformers' generate does from `convert
--to hf` of the checkpoint (whose tokenizer loads in AutoTokenizer and encodes identically), and the
GGUF export runs in llama.cpp itself with the same token ids, logits and greedy continuation. Each
published byte-level pre-tokenizer (GPT-2, Llama 3, Qwen 2, SmolLM2) tokenizes in llama.cpp as in
transformers, under the name llama.cpp's converter writes; an unknown one is refused."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from convert_runs import ENV
from hf_tokenizers import HARD_TEXTS
from llamacpp import available as llamacpp_missing
from shared_corpus import sentence_docs

GRIDTRAIN = [sys.executable, "-m", "gridtrain.launcher.cli"]
CHECK = Path(__file__).parent / "workers" / "hf_flow_check.py"
PROMPT = "the quick brown fox"


def gridtrain(*args, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*GRIDTRAIN, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, f"gridtrain {' '.join(map(str, args))}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def flow(tmp_path_factory, hf_tokenizers) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf-flow")
    model_dir = shutil.copytree(hf_tokenizers["llama3"], root / "llama3-hf")
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=500000.0, tie_word_embeddings=False, initializer_range=0.1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    out = {"model": model_dir, "root": root}
    gridtrain("convert", model_dir, "--to", "gridtrain", "--out", root / "from-hf.yaml")
    out["from_hf"] = yaml.safe_load((root / "from-hf.yaml").read_text())
    jsonl = root / "sentences.jsonl"
    texts = sentence_docs() + HARD_TEXTS
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for workers in (1, 2):
        gridtrain("preprocess", "--input", jsonl, "--tokenizer", model_dir, "--output-prefix", root / f"w{workers}",
                  "--workers", workers)
    out["texts"] = texts
    run = {"parallel": {"tensor_parallel": 2, "pipeline_parallel": 2, "zero_stage": 1},
           "data": {"blend": [[1.0, str(root / "w2")]], "split": "90,10,0", "seq_length": 64},
           "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1},
           "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 1, "run_dir": str(root / "run"),
                     "eval_interval": 0},
           "checkpoint": {"interval_steps": 2}, "logging": {"tensorboard": False}}
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    gridtrain("train", root / "from-hf.yaml", root / "run.yaml", "--nproc-per-node", 4)
    ckpts = root / "run" / "checkpoints"
    out["generated"] = gridtrain("generate", ckpts, "--prompt", PROMPT, "--max-new-tokens", 24).stdout
    gridtrain("convert", ckpts, "--to", "hf", "--out", root / "export")
    gridtrain("convert", ckpts, "--to", "gguf", "--out", root / "gguf" / "model.gguf", "--dtype", "f32")
    check = subprocess.run([sys.executable, str(CHECK), str(root / "check.json"), str(model_dir), str(root / "export"),
                            str(root / "gguf" / "model.gguf"), PROMPT], capture_output=True, text=True, env=ENV,
                           timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    out["check"] = json.loads((root / "check.json").read_text())
    return out


def test_convert_names_the_folder_as_the_tokenizer(flow):
    assert flow["from_hf"]["data"]["tokenizer"] == str(flow["model"].resolve())
    assert flow["from_hf"]["train"]["init_from"] == str(flow["model"].resolve())


def test_shards_hold_transformers_ids_and_do_not_depend_on_workers(flow):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    root = flow["root"]
    for suffix in (".bin", ".idx"):
        assert (root / f"w1{suffix}").read_bytes() == (root / f"w2{suffix}").read_bytes()
    tok = AutoTokenizer.from_pretrained(flow["model"], split_special_tokens=True)
    shards = IndexedDataset(str(root / "w2"))
    expected = [tok(t).input_ids + [tok.eos_token_id] for t in flow["texts"] if t.strip()]
    assert [shards[i].tolist() for i in range(len(shards))] == expected
    assert expected[0][0] == tok.bos_token_id  # Llama 3 documents start with BOS
    summary = json.loads((root / "w2.summary.json").read_text())
    empty = sum(not t.strip() for t in flow["texts"])  # "", " ", "\n": skipped and counted
    assert summary["documents"] == len(expected) and summary["empty_documents"]["count"] == empty == 3


def test_generate_equals_transformers_on_the_export(flow):
    check = flow["check"]
    assert check["tokenizer_mismatches"] == [] and check["tokenizer_class"] != "LlamaTokenizer"
    assert set(check["files"]) >= {"tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"}
    assert len(check["greedy_ids"]) == 24 or check["greedy_ids"][-1] in check["stop_ids"]
    assert flow["generated"] == check["greedy_text"] + "\n"


def test_gguf_runs_in_llamacpp_with_the_same_ids_logits_and_tokens(flow):
    if llamacpp_missing():
        pytest.skip(llamacpp_missing())
    check = flow["check"]
    assert check["gguf_pre"] == "llama-bpe" and check["gguf_model"] == "gpt2"
    assert check["gguf_tokenizer_mismatches"] == [] and check["gguf_prompt_ids"]  # BOS added as Llama 3 does
    assert check["gguf_gap"] <= 1e-5 and check["scale"] > 1.0, check
    assert check["gguf_greedy"] == check["greedy_ids"]
    assert check["transformers_gguf_mismatches"] == [] and check["transformers_gguf_gap"] <= 1e-4, check


# llama.cpp's names for the published pre-tokenizers (llama-vocab.cpp; what convert_hf_to_gguf.py
# writes for GPT-2, Llama 3, Qwen 2/2.5 and SmolLM2).
PRE_NAMES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2", "smollm2": "smollm"}
VOCAB_CHECK = Path(__file__).parent / "workers" / "gguf_vocab_check.py"


def tiny_model_folder(tokenizer_folder: Path, folder: Path) -> Path:
    """A one-layer random Llama holding the tokenizer folder: something `convert --to gguf` exports."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shutil.copytree(tokenizer_folder, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_published_pre_tokenizers_tokenize_in_llamacpp_as_in_transformers(tmp_path, hf_tokenizers):
    if llamacpp_missing():
        pytest.skip(llamacpp_missing())
    specs = [f"{family}={tiny_model_folder(folder, tmp_path / family)}" for family, folder in hf_tokenizers.items()]
    proc = subprocess.run([sys.executable, str(VOCAB_CHECK), str(tmp_path / "out.json"), str(tmp_path / "work"),
                           *specs], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert {family: r["pre"] for family, r in results.items()} == PRE_NAMES
    for family, r in results.items():
        assert r["mismatches"] == [], (family, r["mismatches"])
        assert r["control_mismatches"], family  # another family's name splits the hard texts otherwise


def test_unknown_pre_tokenizer_is_refused_in_one_line(tmp_path, hf_tokenizers):
    folder = tiny_model_folder(hf_tokenizers["gpt2"], tmp_path / "other")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder / "tokenizer_config.json").read_text())  # GPT2Tokenizer would bring its own
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    proc = subprocess.run([*GRIDTRAIN, "convert", str(folder), "--to", "gguf", "--out", str(tmp_path / "x.gguf")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "pre-tokenizer" in lines[0] and "--to hf" in lines[0], proc.stderr
    assert not (tmp_path / "x.gguf").exists()
