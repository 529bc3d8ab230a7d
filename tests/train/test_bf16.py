"""bf16 against fp32 on real text: the tiny llama trained 30 steps both ways (2 ranks, ZeRO-1, the
same data and seed) learns, and the bf16 loss stays within a few percent of fp32's at every step."""
import json
from pathlib import Path

from multirank import launch

WORKER = Path(__file__).with_name("run_worker.py")
STEPS = 30
# "Within a few percent": measured, the largest step-by-step gap was 0.16% (printed by the test).
CURVE_RTOL = 0.02


def curve(root: Path, corpus: dict, dtype: str) -> list[float]:
    run_dir = root / dtype
    sections = {
        "model": {"family": "llama", "vocab_size": 640, "hidden_size": 128, "num_layers": 2, "num_attention_heads": 4,
                  "num_kv_heads": 2, "max_seq_len": 64},
        "parallel": {"zero_stage": 1},
        "data": {"blend": [[1.0, corpus["prefix"]]], "split": "95,5,0", "seq_length": 64, "tokenizer": corpus["tokenizer"]},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
        "train": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "run_dir": str(run_dir),
                  "eval_interval": 0, "dtype": dtype},
        "checkpoint": {"interval_steps": 0},
        "logging": {"tensorboard": False},
    }
    (root / f"{dtype}.json").write_text(json.dumps(sections))
    launch(WORKER, 2, [root / f"{dtype}.json"], timeout=300)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_bf16_follows_fp32(tmp_path, text_corpus):
    fp32, bf16 = curve(tmp_path, text_corpus, "fp32"), curve(tmp_path, text_corpus, "bf16")
    assert len(fp32) == len(bf16) == STEPS
    gaps = [abs(b - f) / f for b, f in zip(bf16, fp32)]
    print(f"fp32 {fp32[0]:.3f} -> {fp32[-1]:.3f}, bf16 {bf16[0]:.3f} -> {bf16[-1]:.3f}, largest gap {max(gaps):.2%}")
    assert max(gaps) <= CURVE_RTOL
    for losses in (fp32, bf16):  # both learn: the last steps well below the first
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3
    assert bf16 != fp32  # bf16 really ran (a bit-identical curve would mean fp32 twice)
