"""megatron-core internals gridtrain relies on outside its public API, in one place. Read against
megatron-core 0.16.1 (pyproject accepts >=0.16,<0.17).

Lazy imports: megatron.core costs about 5 s to import (measured; it pulls in its training stack), and
the checkpoint code that asks for the RNG tracker must not pay that where megatron was never loaded."""
import sys

_MEGATRON_RANDOM = "megatron.core.tensor_parallel.random"


def model_parallel_rng_tracker():
    """megatron-core's model-parallel RNG tracker if this process already imported and initialised
    it, else None. 0.16.1 records initialisation in the module global
    `_CUDA_RNG_STATE_TRACKER_INITIALIZED` (tensor_parallel/random.py); an uninitialised tracker
    holds nothing worth saving, and megatron is never imported just to ask."""
    module = sys.modules.get(_MEGATRON_RANDOM)
    if module is None or not getattr(module, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False):
        return None
    tracker = module.get_cuda_rng_tracker()
    return tracker if tracker.is_initialized() else None


def restore_model_parallel_rng(states: dict) -> None:
    """Give megatron-core's tracker the named RNG states `get_states()` returned at save time."""
    import megatron.core.tensor_parallel.random as random_module

    random_module.get_cuda_rng_tracker().set_states(dict(states))
