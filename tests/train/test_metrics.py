"""Metrics: MFU arithmetic, JSONL/TensorBoard contents, checkpoint records, the matmul probe."""
import json
import math

import pytest
import torch

from gridtrain.train.config import LoggingConfig
from gridtrain.train.metrics import (
    build_metrics_writer,
    checkpoint_record,
    eval_record,
    format_record,
    gather_memory,
    measure_matmul_flops,
    mfu,
    step_record,
    total_peak_flops,
)

CPU = torch.device("cpu")


def test_mfu_is_achieved_over_the_peak_of_all_ranks():
    """MFU of a step record: 4,096 tokens in 0.5 s at 2e9 FLOPs per token (16.4 TFLOP/s achieved)
    on 4 ranks of 8e12 FLOP/s each (32 TFLOP/s peak together) is 0.512. (training_flops_per_token
    itself is checked against FlopCounterMode in tests/model/test_flops.py.)"""
    rec = step_record(step=1, loss=1.0, grad_norm=1.0, lr=1e-3, step_time=0.5, tokens=4096,
                      flops_per_token=2e9, peak_flops_total=4 * 8e12, memory=[1], consumed_samples=4)
    assert rec["mfu"] == pytest.approx(0.512, rel=1e-12)
    assert mfu(2e9, 8192.0, 3.2e13) == pytest.approx(0.512, rel=1e-12)


def test_checkpoint_record_line_and_jsonl(tmp_path, capsys):
    writer = build_metrics_writer(LoggingConfig(tensorboard=False), str(tmp_path), is_main=True, total_steps=100)
    writer.write(checkpoint_record(40, str(tmp_path / "checkpoints" / "step_00000040"), 250_000_000, 0.5))
    writer.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (record["kind"], record["step"], record["ckpt_bytes"], record["ckpt_gb_per_s"]) == ("checkpoint", 40, 250_000_000, 0.5)
    assert "step  40/100 | checkpoint step_00000040: 250.0 MB in 0.50 s (0.500 GB/s)" in capsys.readouterr().out


def test_step_record_fields_and_values():
    rec = step_record(step=7, loss=2.5, grad_norm=0.75, lr=1e-3, step_time=0.5, tokens=4096,
                      flops_per_token=1e6, peak_flops_total=1e11, memory=[300 * 2**20, 200 * 2**20],
                      consumed_samples=224)
    assert rec["tokens_per_s"] == pytest.approx(8192.0)
    assert rec["model_tflops_per_s"] == pytest.approx(8192e6 / 1e12)
    assert rec["mfu"] == pytest.approx(8192e6 / 1e11)
    assert rec["mem_max_mb"] == pytest.approx(300.0)
    line = format_record(rec, total_steps=100)
    for piece in ("step   7/100", "loss 2.5000", "lr 1.00e-03", "gnorm 0.750", "500 ms", "8,192 tok/s",
                  "MFU 8.19%", "mem 300 MB", "samples 224"):
        assert piece in line, (piece, line)
    ev = eval_record(10, math.log(20.0))
    assert ev["val_ppl"] == pytest.approx(20.0) and "val ppl 20.00" in format_record(ev, 100)
    assert eval_record(10, 1000.0)["val_ppl"] == math.inf


def test_writer_writes_jsonl_and_tensorboard(tmp_path):
    writer = build_metrics_writer(LoggingConfig(), str(tmp_path), is_main=True, total_steps=3)
    memory = gather_memory(CPU)
    for step in (1, 2, 3):
        writer.write(step_record(step, 4.0 / step, 1.0, 1e-3, 0.25, 1024, 1e6, 1e10, memory, 8 * step))
    writer.write(eval_record(3, 1.5))
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["train"] * 3 + ["eval"]
    assert [r["loss"] for r in lines[:3]] == [4.0, 2.0, 4.0 / 3]
    assert 10 * 2**20 < lines[0]["mem_bytes_per_rank"][0] < 64 * 2**30  # a real RSS, not 0
    assert lines[2]["consumed_samples"] == 24 and lines[3]["val_ppl"] == pytest.approx(math.exp(1.5))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([4.0, 2.0, 4.0 / 3])
    assert [e.step for e in events.Scalars("val/val_loss")] == [3]
    assert "memory_mb/rank0" in events.Tags()["scalars"]


def test_writer_off_rank_zero_and_disabled_sinks_write_nothing(tmp_path, capsys):
    silent = build_metrics_writer(LoggingConfig(), str(tmp_path / "r1"), is_main=False, total_steps=1)
    silent.write(eval_record(1, 1.0))
    silent.note("hello")
    bare = build_metrics_writer(LoggingConfig(jsonl=False, tensorboard=False), str(tmp_path / "r0"), True, 1)
    bare.write(eval_record(1, 1.0))
    assert not (tmp_path / "r1").exists() and list((tmp_path / "r0").iterdir()) == []
    assert capsys.readouterr().out.count("val loss 1.0000") == 1


def test_matmul_probe_is_plausible_and_config_peak_wins():
    measured = measure_matmul_flops(CPU, size=256, seconds=0.05)
    assert 1e8 < measured < 1e13  # between a slow core and a many-core server
    total, source = total_peak_flops(None, CPU)
    assert 1e8 < total < 1e13 and "measured" in source
    assert total_peak_flops(5e12, CPU) == (5e12, "train.peak_flops = 5.000e+12 FLOP/s per device")
