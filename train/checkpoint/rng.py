"""Per-rank RNG states: Python, NumPy, torch (CPU and every CUDA device) and megatron-core's
model-parallel RNG tracker. Dropout and any sampling draw from these, so a resumed run continues the
same random streams as the uninterrupted one."""
import random

import numpy as np
import torch

from gridtrain.parallel.megatron_compat import model_parallel_rng_tracker, restore_model_parallel_rng


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "megatron_tracker": None,
    }
    tracker = model_parallel_rng_tracker()
    if tracker is not None:
        state["megatron_tracker"] = {name: value.clone() for name, value in tracker.get_states().items()}
    return state


def restore_rng_state(state: dict) -> list[str]:
    """Restore what `capture_rng_state` saved; returns the names of parts that could not be
    restored here (e.g. CUDA states on a CPU-only resume), for the caller to report."""
    skipped = []
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            skipped.append("cuda")
    if state.get("megatron_tracker"):
        restore_model_parallel_rng(state["megatron_tracker"])
    return skipped
