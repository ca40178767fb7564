"""Model loading: registered names (the default SmolLM2-135M from its GGUF, tiny random models),
local Hugging Face folders, and locally cached hub ids."""
from .byte_tokenizer import build_byte_tokenizer
from ..cache import rtpurbo_cache_root
from .config import ModelConfig
from .loading import DEFAULT_MODEL, REGISTERED_MODELS, load_model, resolve_dtype
from .smollm2 import ensure_smollm2_folder, find_gguf_file
from .tiny import TINY_FAMILIES

__all__ = [
    "DEFAULT_MODEL",
    "REGISTERED_MODELS",
    "TINY_FAMILIES",
    "ModelConfig",
    "build_byte_tokenizer",
    "ensure_smollm2_folder",
    "find_gguf_file",
    "load_model",
    "resolve_dtype",
    "rtpurbo_cache_root",
]
