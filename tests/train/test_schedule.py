"""LR schedule values at warmup end, mid-decay and end, against hand-computed Megatron formulas."""
import math

import pytest

from gridtrain.errors import ConfigError
from gridtrain.parallel.config import OptimConfig
from gridtrain.train.schedule import lr_at

TOTAL = 110


def optim(schedule: str, **kw) -> OptimConfig:
    return OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, **kw)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_zero_and_reaches_peak(schedule):
    cfg = optim(schedule)
    assert lr_at(1, cfg, TOTAL) == pytest.approx(0.1, abs=1e-12)
    assert lr_at(5, cfg, TOTAL) == pytest.approx(0.5, abs=1e-12)
    assert lr_at(10, cfg, TOTAL) == pytest.approx(1.0, abs=1e-12)


# step 35 is a quarter of the decay (25 of 100 steps), step 60 half, step 110 the end.
EXPECTED = {
    "cosine": {35: 0.1 + 0.9 * 0.5 * (math.cos(math.pi / 4) + 1), 60: 0.55, 110: 0.1, 200: 0.1},
    "linear": {35: 0.1 + 0.9 * 0.75, 60: 0.55, 110: 0.1, 200: 0.1},
    "constant": {35: 1.0, 60: 1.0, 110: 1.0, 200: 1.0},
}


@pytest.mark.parametrize("schedule", sorted(EXPECTED))
def test_decay_values(schedule):
    cfg = optim(schedule)
    for step, expected in EXPECTED[schedule].items():
        assert lr_at(step, cfg, TOTAL) == pytest.approx(expected, abs=1e-12), (schedule, step)


def test_tolerance_separates_cosine_from_linear():
    # Negative control: at a quarter of the decay the two formulas differ by ~0.09, far beyond 1e-12,
    # so swapping them (or an off-by-one of a step: ~0.01) fails the checks above.
    cosine, linear = lr_at(35, optim("cosine"), TOTAL), lr_at(35, optim("linear"), TOTAL)
    assert abs(cosine - linear) > 0.05
    assert abs(lr_at(36, optim("cosine"), TOTAL) - cosine) > 1e-3


def test_decay_steps_shorter_than_the_run_then_holds_min_lr():
    cfg = optim("cosine", decay_steps=60)
    assert lr_at(35, cfg, TOTAL) == pytest.approx(0.55, abs=1e-12)  # halfway from step 10 to 60
    assert lr_at(60, cfg, TOTAL) == pytest.approx(0.1, abs=1e-12)
    assert lr_at(61, cfg, TOTAL) == pytest.approx(0.1, abs=1e-12)


def test_no_warmup_starts_decaying_at_step_one():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(1, cfg, 100) == pytest.approx(0.99, abs=1e-12)
    assert lr_at(100, cfg, 100) == pytest.approx(0.0, abs=1e-12)


def test_unknown_schedule_names_the_field():
    with pytest.raises(ConfigError, match="optim.schedule='step'"):
        lr_at(50, optim("step"), TOTAL)
