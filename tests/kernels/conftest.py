"""Shared set-up for the kernel tests: Triton's CPU interpreter, chosen before any @triton.jit runs."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402


def _allow_numpy24_in_interpreter():
    # Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with
    # int(array), which NumPy >= 2.4 rejects; the kernels loop over counts read from memory
    # (block_cnt, qb + 1), so on CPU they would fail there only.
    try:
        int(np.zeros(1))
        return
    except TypeError:
        pass
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor


_allow_numpy24_in_interpreter()
