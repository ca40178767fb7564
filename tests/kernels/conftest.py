"""Shared set-up for the kernel tests: Triton's CPU interpreter, chosen before any @triton.jit runs
(tests/conftest.py lets the interpreter run under NumPy >= 2.4)."""
import os

os.environ["TRITON_INTERPRET"] = "1"
