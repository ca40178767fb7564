"""Backend choice shared by every op: `auto` runs Triton on CUDA tensors, the PyTorch reference elsewhere."""
import importlib.util
import os

BACKENDS = ("auto", "reference", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        on_gpu = getattr(device, "type", str(device)) == "cuda"
        return "triton" if on_gpu and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package: pip install 'rtpurbo-train[triton]'")
        if getattr(device, "type", str(device)) != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")
    return backend
