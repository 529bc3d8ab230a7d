"""A tiny llama learns a repetitive synthetic corpus through gridtrain.train.loop.run on 2 ranks,
and with lr=0 (negative control) it does not."""
import json
from pathlib import Path

import numpy as np
import pytest
from multirank import launch
from run_config import sections, write_json

WORKER = Path(__file__).with_name("run_worker.py")


def config_of(data: dict, run_dir: Path, lr: float, steps: int, **parallel) -> dict:
    return sections(data, run_dir, parallel=parallel, optim={"lr": lr, "min_lr": lr / 10, "warmup_steps": 5,
                                                            "weight_decay": 0.0},
                    train={"steps": steps, "global_batch_size": 8, "eval_interval": 20, "eval_steps": 2},
                    logging={"tensorboard": True})


def run_training(root: Path, corpus: dict, lr: float, steps: int, nproc: int, **parallel) -> tuple[list, list, str]:
    """Train through the loop on `nproc` ranks; (train records, eval records, console output)."""
    run_dir = root / "run"
    config = write_json(root / "config.json", config_of(corpus, run_dir, lr, steps, **parallel))
    proc = launch(WORKER, nproc, [config], timeout=240)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    return train, evals, proc.stdout


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory, sentences_corpus) -> tuple[list, list, str]:
    """40 steps on 2 ranks, DP=2 with ZeRO-1 (the demo's layout)."""
    return run_training(tmp_path_factory.mktemp("dp2"), sentences_corpus, lr=3e-3, steps=40, nproc=2)


def test_tiny_llama_learns_on_two_ranks(dp2_run):
    train, evals, stdout = dp2_run
    assert [r["step"] for r in train] == list(range(1, 41))
    first, last = train[0]["loss"], train[-1]["loss"]
    assert last < 0.4 * first, (first, last)
    assert [r["step"] for r in evals] == [0, 20, 40] and evals[-1]["val_loss"] < 0.4 * evals[0]["val_loss"]
    assert train[-1]["consumed_samples"] == 40 * 8
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and len(r["mem_bytes_per_rank"]) == 2 for r in train)
    assert train[5]["lr"] == pytest.approx(3e-3 * (1 + np.cos(np.pi * 1 / 35)) / 2 * 0.9 + 3e-4, rel=1e-6)
    assert "done: 40 steps" in stdout and "peak FLOP/s for MFU" in stdout


def test_pipeline_layout_gives_the_same_training_and_validation_losses(tmp_path, sentences_corpus, dp2_run):
    # The same global batches at PP=2 (DP=1): the loop hands each layout the same samples and
    # validates on the same fixed set, so every train and validation loss matches the DP=2 run.
    train, evals, _ = run_training(tmp_path, sentences_corpus, lr=3e-3, steps=40, nproc=2, pipeline_parallel=2)
    ref_train, ref_evals, _ = dp2_run
    losses = [r["loss"] for r in train] + [r["val_loss"] for r in evals]
    ref = [r["loss"] for r in ref_train] + [r["val_loss"] for r in ref_evals]
    assert losses == pytest.approx(ref, rel=1e-5, abs=0)
    # Negative control: data one step out of place (consecutive losses) is far outside 1e-5.
    assert losses[1:40] != pytest.approx(ref[:39], rel=1e-5, abs=0)
    assert min(abs(a - b) / b for a, b in zip(ref[1:40], ref[:39])) > 1e-3


def test_lr_zero_does_not_learn(tmp_path, sentences_corpus):
    # Negative control for the learning test: the same model, data and schedule with no updates
    # (1 rank, fewer steps, to save time) keeps its starting loss.
    train, _, _ = run_training(tmp_path, sentences_corpus, lr=0.0, steps=12, nproc=1)
    first, last = train[0]["loss"], train[-1]["loss"]
    assert last > 0.9 * first, (first, last)


def test_non_finite_loss_stops_all_ranks_with_a_clear_error(tmp_path, sentences_corpus):
    # lr=inf turns weights into inf/nan at the first update, so step 2's loss is nan on both ranks;
    # both must raise the same error at the same step (a rank left waiting would hang the launch).
    cfg = config_of(sentences_corpus, tmp_path / "run", lr=float("inf"), steps=4)
    cfg["optim"]["warmup_steps"] = 0
    config = write_json(tmp_path / "config.json", cfg)
    with pytest.raises(AssertionError) as failed:
        launch(WORKER, 2, [config], timeout=120)
    text = str(failed.value)
    assert text.count("TrainingDiverged: train: the loss became nan at step 2") == 2, text[-3000:]
    assert "lower optim.lr" in text
