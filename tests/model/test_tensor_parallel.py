"""TP=2 on 2 ranks reproduces the TP=1 decoder: weights exactly, logits, loss and gradients."""
from pathlib import Path

from multirank import launch

WORKER = Path(__file__).with_name("tp_worker.py")


def test_tp2_matches_tp1_for_both_families():
    out = launch(WORKER, 2).stdout
    for rank in (0, 1):
        for family in ("gpt2", "llama"):
            assert f"rank {rank}: {family} TP=2 matches TP=1" in out, out
