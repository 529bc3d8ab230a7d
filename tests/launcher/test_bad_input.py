"""Bad input of every kind found by trying commands as a new user would: one line naming the flag or
field, the value and the fix, exit 2, no traceback, before any rank starts (in process: every
case is answered without training). The data-loss cases are in test_no_data_loss.py."""
import json
import signal
import subprocess
import sys

import pytest

from gridtrain.launcher.cli import main


@pytest.fixture(autouse=True)
def signal_handlers():
    """`launch` run in process installs the rank's early stop-signal handlers (catch_early): put
    back this process's own, for the tests that run after these in it."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


def answer(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


def one_line(code: int, err: str, *parts: str) -> None:
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


@pytest.fixture
def config(tmp_path, corpus):
    """A valid run config on the session corpus: each case breaks one thing of it."""
    path = tmp_path / "run.yaml"
    path.write_text(f"""
model: {{family: llama, vocab_size: 768, hidden_size: 64, num_layers: 2, num_attention_heads: 4, max_seq_len: 64}}
data: {{blend: [[1.0, {corpus.text}]], tokenizer: {corpus.tokenizer}, seq_length: 64}}
train: {{steps: 2, global_batch_size: 4, micro_batch_size: 2, run_dir: {tmp_path / 'run'}}}
""")
    return path


@pytest.mark.parametrize("overrides, parts", [
    (["--model.num_layers=100000000000000000000"], ["model.num_layers=100000000000000000000: expected an integer of at most"]),
    (["--model.num_layers=100000"], ["model.num_layers=100000: must be <= 512"]),
    (["--optim.lr=.inf"], ["optim.lr=inf: expected a finite number"]),
    (["--optim.eps=.nan"], ["optim.eps=nan: expected a finite number"]),
    (["--parallel.timeout_minutes=.inf"], ["parallel.timeout_minutes=inf: expected a finite number"]),
    (["--train.run_dir=/proc/version/run"], ["train.run_dir='/proc/version/run'", "is a file, not a folder"]),
    (["--train.init_from=/nonexistent/model"], ["train.init_from='/nonexistent/model'", "no such file or folder"]),
])
def test_dry_run_checks_what_train_checks(capsys, config, overrides, parts):
    one_line(*answer(capsys, "train", config, *overrides, "--dry-run"), *parts)


def test_files_that_are_not_what_they_claim(capsys, tmp_path, config):
    (tmp_path / "latin1.yaml").write_bytes(b"model:\n  family: ll\xe9ma\n")
    one_line(*answer(capsys, "train", tmp_path / "latin1.yaml", "--dry-run"), "is not UTF-8 text (byte 0xe9",
             "give a YAML file saved as UTF-8")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    one_line(*answer(capsys, "train", tmp_path / "binary.yaml", "--dry-run"), "binary.yaml")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("[1, 2]")
    (hf / "model.safetensors").write_bytes(b"")
    one_line(*answer(capsys, "convert", hf, "--to", "gridtrain", "--out", tmp_path / "c.yaml"),
             "config.json: holds a JSON list, not an object of model fields")
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line(*answer(capsys, "convert", hf, "--to", "gridtrain", "--out", tmp_path / "c.yaml"),
             "config.json: no 'num_attention_heads' field (model_type 'llama' needs it)")
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 768, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 64}))
    (hf / "model.safetensors").unlink()
    one_line(*answer(capsys, "convert", hf, "--to", "gridtrain", "--out", tmp_path / "c.yaml"),
             "no *.safetensors (or *.bin) weights next to config.json")
    one_line(*answer(capsys, "train", config, f"--train.init_from={hf}", "--dry-run"),
             "train.init_from=", "no *.safetensors (or *.bin) weights")
    (tmp_path / "prompts.txt").write_bytes(b"caf\xe9\n")
    one_line(*answer(capsys, "generate", hf, "--prompt-file", tmp_path / "prompts.txt"), "--prompt-file=",
             "not UTF-8 text (byte 0xe9")


def test_sampling_flags_name_themselves(capsys, tmp_path):
    code, err = answer(capsys, "generate", tmp_path, "--prompt", "x", "--temperature", "nan", "--top-p", "nan",
                       "--max-new-tokens", "0", "--top-k", "-1")
    one_line(code, err, "--max-new-tokens 0: must be >= 1", "--temperature nan: must be a number >= 0",
             "--top-k -1: must be >= 0", "--top-p nan: must be in (0, 1]")
    one_line(*answer(capsys, "generate", tmp_path, "--prompt", "x", "--system", "Be brief."),
             "--system needs --chat (it is a turn of the chat template)")


def test_rank_environments_that_cannot_be(capsys, monkeypatch, config):
    for env, part in (({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: a world needs at least one rank"),
                      ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4: must be in 0..3 (WORLD_SIZE=4)"),
                      ({"SLURM_PROCID": "-1", "SLURM_NTASKS": "2"}, "SLURM_PROCID=-1: must be in 0..1")):
        with monkeypatch.context() as m:
            for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
                m.delenv(name, raising=False)
            for name, value in env.items():
                m.setenv(name, value)
            one_line(*answer(capsys, "launch", config), part)
            assert main(["env"]) == 2 and f"error: {part}" in capsys.readouterr().out


def test_cuda_asked_for_on_a_host_without_one(capsys, config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    one_line(*answer(capsys, "train", config, "--device", "cuda"), "--device cuda: torch sees no CUDA device")


def test_argparse_errors_are_one_line_and_hidden_commands_stay_hidden(capsys):
    for args, part in ((["tran"], "unknown command 'tran'; did you mean 'train'?"),
                       (["slurm-jb"], "unknown command 'slurm-jb'; commands: train"),
                       (["convert", "x", "--to", "onnx", "--out", "y"], "gridtrain convert: error: argument --to"),
                       (["preprocess"], "the following arguments are required")):
        with pytest.raises(SystemExit) as stopped:
            main(args)
        err = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and len(err.splitlines()) == 1 and part in err, err
        assert "slurm-job" not in err and "usage:" not in err


def test_bf16_without_a_stage_gets_zero_1_and_says_so(capsys, config):
    assert main(["train", str(config), "--train.dtype=bf16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# parallel.zero_stage: 1, chosen for train.dtype bf16 without a pipeline" in out
    assert "zero_stage: 1" in out.split("# derived")[0]
    assert main(["train", str(config), "--train.dtype=bf16", "--parallel.zero_stage=0", "--dry-run"]) == 2
    assert "DeepSpeed's ZeRO-0 bf16 optimizer drifts" in capsys.readouterr().err  # an explicit 0 is still refused


def test_data_index_answers_a_bad_config_before_importing_megatron(config):
    code = ("import sys; from gridtrain.launcher.cli import main; rc = main(sys.argv[1:]); "
            "print('MEGATRON', 'megatron.core' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "data", "index", str(config), "--model.num_attention_heads=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "MEGATRON False" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("gridtrain: error: model.hidden_size=64: must be a multiple of")
