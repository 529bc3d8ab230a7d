"""The `gridtrain` command as a user meets it (subprocesses): bad config -> one line, exit 2, no
traceback; --dry-run numbers against values worked by hand; `gridtrain env`."""
import os
import subprocess
import sys

import yaml

GRIDTRAIN = [sys.executable, "-m", "gridtrain.launcher.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

SMALL = """
model: {family: llama, vocab_size: 1000, hidden_size: 64, num_layers: 4, num_attention_heads: 8,
        num_kv_heads: 4, ffn_hidden_size: 256, max_seq_len: 128}
parallel: {tensor_parallel: 2, pipeline_parallel: 2, zero_stage: 1}
data: {blend: [[1.0, PREFIX]], tokenizer: TOKENIZER, seq_length: 128}
train: {global_batch_size: 32, micro_batch_size: 2, steps: 10}
"""


def small(corpus) -> str:
    """SMALL on the session corpus's text shards and tokenizer (a dry run checks they exist)."""
    return SMALL.replace("PREFIX", corpus.text).replace("TOKENIZER", corpus.tokenizer)


def gridtrain(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDTRAIN, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=120, cwd=cwd)


def test_bad_config_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_size: 100, num_attention_heads: 12, num_kv_heads: null}\n"
                   "parallel: {tensor_parallel: 5}\ndata: {blend: [[1, d]], tokenizer: t.model}\n")
    proc = gridtrain("train", bad, "--nproc-per-node", 5)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("gridtrain: error: 3 config problems: model.hidden_size=100: must be a multiple of "
                               "model.num_attention_heads (12)")
    assert "model.num_attention_heads=12: must be a multiple of parallel.tensor_parallel (5)" in lines[0]
    missing = gridtrain("train", tmp_path / "nope.yaml", "--dry-run")
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1 and "nope.yaml" in missing.stderr


def test_dry_run_numbers_match_hand_computed(tmp_path, corpus):
    (tmp_path / "small.yaml").write_text(small(corpus))
    proc = gridtrain("train", "small.yaml", "--dry-run", "--nnodes", 2, "--nproc-per-node", 4, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = yaml.safe_load(proc.stdout)
    assert out["model"]["hidden_size"] == 64 and out["parallel"]["zero_stage"] == 1  # the resolved config
    d = out["derived"]
    # world 8 = TP 2 x PP 2 x DP 2; 32 samples / (2 per micro-batch x 2 DP ranks) = 8 micro-batches
    assert (d["world_size"], d["layout"], d["micro_batches_per_step"]) == (8, "TP=2 x PP=2 x DP=2", 8)
    assert d["pipeline_bubble_fraction"] == round(1 / 9, 6)  # (p-1)/(m+p-1) = 1/9
    assert (d["global_batch_samples"], d["global_batch_tokens"], d["training_tokens"]) == (32, 4096, 40960)
    # vocab 1000 padded to 1024 (128 x TP 2); block = attention 4096+2*2048+4096 + SwiGLU 3*64*256 + 2 norms of 64
    assert d["padded_vocab_size"] == 1024
    assert d["parameters_with_padded_vocab"] == 1024 * 64 * 2 + 4 * (12288 + 49152 + 128) + 64
    assert d["parameters"] == 1000 * 64 * 2 + 4 * (12288 + 49152 + 128) + 64  # as a model card counts
    # 6 x (layers + unpadded head) + 12 L h s
    assert d["training_flops_per_token"] == 6 * (4 * 61568 + 1000 * 64) + 12 * 4 * 64 * 128
    # per TP rank: embedding 512*64, block 6144 + 24576 + 128; stages [emb, 2 blocks] | [2 blocks, norm, head]
    assert d["parameters_per_rank_by_stage"] == [32768 + 2 * 30848, 2 * 30848 + 64 + 32768]
    psi = 2 * 30848 + 64 + 32768
    memory = d["memory_per_rank_bytes"]
    assert (memory["zero_stage"], memory["dtype"]) == (1, "fp32")
    assert (memory["weights"], memory["gradients"], memory["optimizer"]) == (4 * psi, 4 * psi, 12 * psi // 2)


def test_dry_run_with_overrides_and_zero_3(tmp_path, corpus):
    (tmp_path / "small.yaml").write_text(small(corpus))
    proc = gridtrain("train", "small.yaml", "--parallel.pipeline_parallel=1", "--parallel.zero_stage=3", "--dry-run",
                     f"--data.blend=[[0.5, {corpus.text}], [0.5, {corpus.sentences}]]", "--nproc-per-node", 4, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    blend = [[0.5, corpus.text], [0.5, corpus.sentences]]
    assert yaml.safe_load(proc.stdout)["data"]["blend"] == blend  # a value with spaces
    d = yaml.safe_load(proc.stdout)["derived"]
    psi = d["parameters_per_rank_by_stage"][0]
    assert psi == 2 * 32768 + 4 * 30848 + 64
    assert d["pipeline_bubble_fraction"] == 0.0 and d["micro_batches_per_step"] == 8
    memory = d["memory_per_rank_bytes"]
    assert (memory["weights"], memory["gradients"], memory["optimizer"]) == (2 * psi, 2 * psi, 6 * psi)


def test_unknown_flag_for_a_command_without_overrides_is_rejected():
    proc = gridtrain("env", "--model.hidden_size=3")
    assert proc.returncode == 2 and "unrecognized arguments: --model.hidden_size=3" in proc.stderr


def test_env_reports_versions_and_devices():
    proc = gridtrain("env")
    assert proc.returncode == 0, proc.stderr
    rows = dict(line.split(None, 1) if " " in line else (line, "") for line in proc.stdout.splitlines())
    text = proc.stdout
    for name in ("python", "torch", "deepspeed", "megatron-core", "sentencepiece", "mpi4py", "apex", "backend", "devices"):
        assert f"\n{name} " in "\n" + text, name
    import torch
    assert torch.__version__ in text
    assert "norm implementation" in text
    assert rows["backend"].strip() == ("nccl" if torch.cuda.is_available() else "gloo")


def test_resume_flags_set_train_resume(tmp_path, corpus):
    (tmp_path / "small.yaml").write_text(small(corpus))
    (tmp_path / "ck" / "step-5").mkdir(parents=True)
    base = ("train", "small.yaml", "--dry-run", "--nproc-per-node", 4)
    assert yaml.safe_load(gridtrain(*base, "--no-resume", cwd=tmp_path).stdout)["train"]["resume"] == "none"
    assert yaml.safe_load(gridtrain(*base, "--resume-from", "ck/step-5", cwd=tmp_path).stdout)["train"]["resume"] == "ck/step-5"
    missing = gridtrain(*base, "--resume-from", "ck/step-6", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "gridtrain: error: train.resume='ck/step-6': no such checkpoint or folder (--resume-from); give a "
        "step_XXXXXXXX folder or a folder of them, or use auto / none")
    both = gridtrain(*base, "--no-resume", "--resume-from", "x", cwd=tmp_path)
    assert both.returncode == 2 and both.stderr.strip() == (
        "gridtrain: error: --resume-from and --no-resume contradict each other; give one")


def test_missing_inputs_fail_before_spawning(tmp_path):
    import sentencepiece as spm

    (tmp_path / "text.txt").write_text("\n".join(f"line {i} of some words to learn pieces from" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=60, model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x_text_document.bin").write_bytes(b"")
    (tmp_path / "small.yaml").write_text(SMALL.replace("TOKENIZER", str(tmp_path / "tok.model"))
                                         .replace("PREFIX", "d/x_text_document").replace("vocab_size: 1000", "vocab_size: 50"))
    proc = gridtrain("train", "small.yaml", "--nproc-per-node", 4, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    pieces = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model")).GetPieceSize()
    assert proc.stderr.strip() == (
        f"gridtrain: error: 2 config problems: model.vocab_size=50: the tokenizer {tmp_path / 'tok.model'} has "
        f"{pieces} tokens; set model.vocab_size to at least {pieces}; data.blend[0]='d/x_text_document': no "
        "d/x_text_document.idx; run `gridtrain preprocess` or fix the prefix")
    assert not (tmp_path / "runs").exists()  # nothing written, no rank started
    gone = gridtrain("train", "small.yaml", "--nproc-per-node", 4, "--data.tokenizer=nope.model", cwd=tmp_path)
    assert "data.tokenizer='nope.model': no such file" in gone.stderr


def test_failure_summary_and_exit_codes(tmp_path, monkeypatch):
    """The agent's failure records (torch's own ProcessFailure) -> one line and exit code: a
    preemption stop (75, with the stragglers the agent SIGTERMed) is not a crash; a SIGKILLed rank
    is named first; a rank's recorded exception is quoted."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, ProcessFailure

    from gridtrain.launcher.spawn import _exit_code, describe_failures

    def failure(code, pid, stamp, error_file="<N/A>"):
        found = ProcessFailure(local_rank=pid % 10, pid=pid, exitcode=code, error_file=error_file)
        found.timestamp = stamp
        return found

    stopped = {0: failure(75, 10, 1), 1: failure(-signal.SIGTERM, 11, 2)}
    assert _exit_code(stopped) == 75 and describe_failures(stopped).startswith("stopped on a preemption signal")
    killed = {0: failure(-signal.SIGTERM, 20, 5), 3: failure(-signal.SIGKILL, 23, 4)}
    assert _exit_code(killed) == 1
    assert describe_failures(killed).startswith("rank 3 (local rank 3, pid 23) failed: killed by SIGKILL; "
                                                "rank 0 (local rank 0, pid 20) failed: killed by SIGTERM")
    crashed = {1: failure(1, 31, 1), 0: failure(75, 30, 2)}
    assert _exit_code(crashed) == 1 and "rank 1 (local rank 1, pid 31) failed: exit code 1" in describe_failures(crashed)
    assert _exit_code({0: failure(2, 40, 1), 1: failure(2, 41, 1)}) == 2
    recorded = tmp_path / "error.json"  # what record() in `gridtrain launch` writes for the agent
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(recorded))
    try:
        raise RuntimeError("rank 1 on host n2 (pid 7) stopped responding")
    except RuntimeError as exc:
        ErrorHandler().record_exception(exc)
    line = describe_failures({0: failure(1, 50, 1, str(recorded))})
    assert line.startswith("rank 0 (local rank 0, pid 50) failed: exit code 1 (RuntimeError: rank 1 on host n2 "
                           "(pid 7) stopped responding); "), line
