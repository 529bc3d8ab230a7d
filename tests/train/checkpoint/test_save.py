"""The host copy behind asynchronous saves: the file torch.save writes from the copy is the file it
writes from the original, the copy does not change when training changes the original, and the
host buffers are reused by the next save."""
import hashlib
import io
from collections import OrderedDict

import torch

from gridtrain.train.checkpoint.save import HostStaging, host_copy


def saved_bytes(obj) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def state_dict() -> OrderedDict:
    """Like DeepSpeed's: views of one flat buffer, a parameter, nested lists and plain values."""
    flat = torch.arange(12, dtype=torch.float32)
    return OrderedDict(first=flat[:6].view(2, 3), rest=flat[6:], weight=torch.nn.Parameter(torch.randn(3, 4)),
                       groups=[{"step": 3, "lr": 1e-3}, (2, flat)], scale=torch.tensor(2.0, dtype=torch.bfloat16),
                       name="mp_rank_00")


def test_host_copy_saves_the_same_bytes_and_is_independent():
    original = state_dict()
    staging = HostStaging()
    copy = host_copy(original, staging, "model.pt")
    assert saved_bytes(copy) == saved_bytes(original)
    assert type(copy) is OrderedDict and type(copy["weight"]) is torch.nn.Parameter
    # Views of one storage still share one (torch.save writes it once, as for the original).
    assert copy["first"].untyped_storage().data_ptr() == copy["rest"].untyped_storage().data_ptr()
    before = saved_bytes(copy)
    original["rest"].add_(1.0)  # training moves on
    with torch.no_grad():
        original["weight"].mul_(2.0)
    assert saved_bytes(copy) == before != saved_bytes(original)  # negative control: the original did change


def test_staging_buffers_are_reused_by_the_next_save():
    staging = HostStaging()
    first = host_copy(state_dict(), staging, "model.pt")
    pointer = first["rest"].untyped_storage().data_ptr()
    second = host_copy(state_dict(), staging, "model.pt")
    assert second["rest"].untyped_storage().data_ptr() == pointer
    other = host_copy(state_dict(), staging, "optim.pt")  # another file has its own buffers
    assert other["rest"].untyped_storage().data_ptr() != pointer
