"""No command destroys what it did not create in the call: through the CLI, each command aimed at a
checkpoint, a source, shards or a tokenizer that exist exits 2 with one line, and every byte that
was on disk is unchanged afterwards; --force replaces only a previous output of the same kind
(the controls show it does replace that)."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from gridtrain.launcher.cli import main


def digest(root: Path) -> dict:
    """relative path -> sha256 of every file under `root` (the whole tree, hidden files too)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def checkpoints(tmp_path) -> Path:
    """A run's checkpoint folder as the trainer leaves it (the commands refuse before reading it)."""
    folder = tmp_path / "run" / "checkpoints"
    step = folder / "step_00000004"
    (step / "ds").mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"format": "gridtrain-checkpoint/1", "step": 4}))
    (step / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"\x00weights" * 100)
    (folder / "latest").write_text("step_00000004\n")
    return folder


@pytest.mark.parametrize("to, out", [
    ("hf", "{ckpts}"), ("hf", "{ckpts}/step_00000004/export"), ("hf", "{run}"),
    ("gguf", "{ckpts}/step_00000004/model.gguf"), ("gridtrain", "{ckpts}/run.yaml"),
])
def test_convert_never_writes_over_or_into_its_source(capsys, checkpoints, to, out):
    before = digest(checkpoints.parent)
    out = out.format(ckpts=checkpoints, run=checkpoints.parent)
    code, err = run_cli(capsys, "convert", checkpoints, "--to", to, "--out", out, "--force")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "source of this command" in err and "--force never replaces a source" in err
    assert digest(checkpoints.parent) == before


def test_convert_force_replaces_a_previous_export_only(capsys, tmp_path, checkpoints):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.bin").write_bytes(b"tokens")
    (tmp_path / "model.gguf").write_bytes(b"GGUF....")
    (tmp_path / "notes.gguf").write_text("not a gguf")
    before = digest(tmp_path)
    cases = [("hf", data, "--force replaces only a previous Hugging Face model folder, and this is not one "
                          "(no config.json in it)"),
             ("gguf", tmp_path / "notes.gguf", "not one (no GGUF header)"),
             ("gguf", data, "is a folder; --to gguf writes one file"),
             ("hf", tmp_path / "model.gguf", "(a file, not a folder)")]
    for to, out, message in cases:
        code, err = run_cli(capsys, "convert", checkpoints, "--to", to, "--out", out, "--force")
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    code, err = run_cli(capsys, "convert", checkpoints, "--to", "gguf", "--out", tmp_path / "model.gguf")
    assert code == 2 and "already exists and is not empty" in err and "pass --force" in err
    assert digest(tmp_path) == before
    # Control: --force over a previous GGUF passes the output check and reaches the source, which
    # this fake checkpoint does not pass.
    code, err = run_cli(capsys, "convert", checkpoints, "--to", "gguf", "--out", tmp_path / "model.gguf", "--force")
    assert code == 2 and len(err.splitlines()) == 1 and "none of its 1 checkpoints is valid" in err, err
    assert "give one of its valid step_XXXXXXXX folders (see `gridtrain checkpoint inspect" in err and "--resume-from" not in err


def test_reshard_refuses_the_source_folder_and_occupied_outputs_before_any_rank(capsys, tmp_path, checkpoints):
    step = checkpoints / "step_00000004"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    before = digest(tmp_path)
    for out, force, message in [(checkpoints, "--force", "holds a source of this command"),
                                (step, "--force", "is the source of this command"),
                                (tmp_path / "mine", None, "already exists and is not empty"),
                                (tmp_path / "mine", "--force", "only a previous folder of checkpoints")]:
        code, err = run_cli(capsys, "checkpoint", "reshard", step, "--tp", 1, "--pp", 1, "--dp", 1, "--out", out,
                            *([force] if force else []))
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert digest(tmp_path) == before


def test_preprocess_and_tokenizer_train_keep_existing_outputs(capsys, tmp_path, corpus):
    """Shards and a tokenizer already there are refused without --force; --force replaces them
    (only them), and a prefix whose files are not shards is refused even with --force."""
    tok_dir = tmp_path / "tok"
    shutil.copytree(Path(corpus.tokenizer).parent, tok_dir)
    prefix = tmp_path / "shards" / "text"
    prefix.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copyfile(corpus.text + suffix, str(prefix) + suffix)
    (tmp_path / "shards" / "other.bin").write_bytes(b"not ours")
    (tmp_path / "shards" / "other.idx").write_bytes(b"not an index")
    before = digest(tmp_path)
    pre = ["preprocess", "--input", corpus.text_jsonl, "--tokenizer", corpus.tokenizer, "--workers", 1]
    code, err = run_cli(capsys, *pre, "--output-prefix", prefix)
    assert code == 2 and err.endswith("text.bin already exists; choose a new prefix, or pass --force to replace "
                                      "that previous output"), err
    code, err = run_cli(capsys, *pre, "--output-prefix", tmp_path / "shards" / "other", "--force")
    assert code == 2 and "is not a shard index megatron-core wrote" in err
    code, err = run_cli(capsys, "tokenizer", "train", "--input", corpus.text_jsonl, "--vocab-size", 500, "--out", tok_dir)
    assert code == 2 and "tokenizer.model already exists (shards made with it would no longer match" in err
    assert digest(tmp_path) == before
    # --force: the previous outputs are replaced by complete new ones, nothing else moves.
    assert run_cli(capsys, *pre, "--output-prefix", prefix, "--force")[0] == 0
    assert digest(tmp_path)["shards/text.bin"] == before["shards/text.bin"]  # same input, same tokenizer
    assert "shards/text.summary.json" in digest(tmp_path)
    assert run_cli(capsys, "tokenizer", "train", "--input", corpus.text_jsonl, "--vocab-size", 500, "--out", tok_dir,
                   "--threads", 1, "--force")[0] == 0
    after = digest(tmp_path)
    assert after["tok/tokenizer.model"] != before["tok/tokenizer.model"]
    assert {k: v for k, v in after.items() if k.startswith("shards/other")} == \
           {k: v for k, v in before.items() if k.startswith("shards/other")}


def test_failed_tokenizer_training_leaves_no_folder_and_names_the_right_fix(capsys, tmp_path, corpus):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "ab"}) + "\n")
    code, err = run_cli(capsys, "tokenizer", "train", "--input", tiny, "--vocab-size", 100000, "--out", tmp_path / "t")
    assert code == 2 and "lower --vocab-size" in err and not (tmp_path / "t").exists(), err
    wide = tmp_path / "wide.jsonl"  # more distinct characters than pieces
    wide.write_text("\n".join(json.dumps({"text": "".join(chr(0x4E00 + i + j) for j in range(40))})
                              for i in range(0, 2000, 40)) + "\n")
    code, err = run_cli(capsys, "tokenizer", "train", "--input", wide, "--vocab-size", 300, "--out", tmp_path / "w")
    assert code == 2 and "raise --vocab-size" in err and not (tmp_path / "w").exists(), err
