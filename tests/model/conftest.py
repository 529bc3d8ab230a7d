"""A one-rank gloo group with megatron-core's parallel_state at TP=1, which the TP layers need even
on one process. Torn down after each module so other test packages find no group left behind."""
import sys
from pathlib import Path

import pytest

# The plain-torch reference (torch_reference.py) is imported by plain name, like tests/multirank.py.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tp1_group(tmp_path_factory):
    import torch.distributed as dist
    from megatron.core import parallel_state

    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
