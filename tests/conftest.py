"""Shared test guards for "this code never makes the host wait for the GPU", checkable on CPU tensors:

- `forbid_host_sync` (fixture -> a context manager class): a TorchDispatchMode that fails on the aten
  ops a host must wait for on a GPU: scalar read-backs (`_local_scalar_dense`, behind `.item()`/`int()`)
  and outputs whose shape depends on the data (`nonzero`, boolean-mask indexing, `unique`, ...). It also
  sees what C++ code calls.
- `forbid_python_syncs` (fixture -> function(patch)): makes the Python-level tensor reads (`.item()`,
  `.tolist()`, `bool()`, `.cpu()`, ...) raise, on a `monkeypatch.context()`.
Also lets Triton's CPU interpreter run under NumPy >= 2.4 (kernel tests, and model tests that run kernels).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _allow_numpy24_in_interpreter():
    # Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with
    # int(array), which NumPy >= 2.4 rejects; the kernels loop over counts read from memory
    # (block_cnt, qb + 1), so on CPU they would fail there only.
    try:
        int(np.zeros(1))
        return
    except TypeError:
        pass
    # Importing triton fixes its settings: choose the interpreter first, as the README's test command does
    # (tests/kernels/conftest.py would set it too late once triton is imported here).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor


_allow_numpy24_in_interpreter()

ATEN_SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "argwhere", "masked_select", "bincount",
                 "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"}
INDEXING_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
PYTHON_READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy", "cpu")


def _data_dependent(func, args) -> bool:
    """Boolean-mask indexing, or repeat_interleave with tensor repeats: the output shape needs the data."""
    if func.overloadpacket.__name__ in INDEXING_OPS:
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
    return func is torch.ops.aten.repeat_interleave.Tensor


class NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ATEN_SYNC_OPS or _data_dependent(func, args):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


def _python_reads_fail(patch) -> None:
    def fail(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host synchronisation: {name}")
        return raiser

    for name in PYTHON_READS:
        patch.setattr(torch.Tensor, name, fail(f"Tensor.{name}"))
    patch.setattr(torch, "nonzero", fail("torch.nonzero"))


@pytest.fixture
def forbid_host_sync():
    return NoHostSync


@pytest.fixture
def forbid_python_syncs():
    return _python_reads_fail
