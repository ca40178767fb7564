"""`no_host_sync()`: fail if the code inside runs a torch op that, on a GPU, makes the host wait for the
device (a scalar read-back, or an output whose size depends on the data). Works on CPU tensors: it
watches the ops through a TorchDispatchMode, so tests can check GPU-side behaviour without a GPU."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "bincount", "masked_select", "unique_dim",
               "_unique", "_unique2", "unique_consecutive", "repeat_interleave"}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class no_host_sync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS or (name in ("index", "index_put", "index_put_") and _has_bool_index(args)):
            raise AssertionError(f"host synchronisation: aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def forbid_host_sync():
    """The `no_host_sync` context manager (a fixture, so every test folder can use it)."""
    return no_host_sync
