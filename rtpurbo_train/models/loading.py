"""`load_model`: a registered name, a local HF folder or a locally cached HF id -> (model, tokenizer).

Nothing is downloaded: hub ids resolve with `local_files_only=True`. Weights load from safetensors
(or `.bin` with `weights_only=True`), never through unrestricted pickle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import UserError
from .config import ModelConfig
from .smollm2 import ensure_smollm2_folder
from .tiny import TINY_FAMILIES, build_tiny_model

DEFAULT_MODEL = "smollm2-135m"
REGISTERED_MODELS: tuple[str, ...] = (DEFAULT_MODEL, *TINY_FAMILIES)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: Optional[Union[str, torch.device]] = None) -> torch.dtype:
    """`auto` = bfloat16 on CUDA, float32 on CPU. Without a device, CUDA means "CUDA is available"
    (the trainer moves the model there later)."""
    if name != "auto":
        return _DTYPES[name]
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return torch.bfloat16 if on_cuda else torch.float32


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(("/", ".json", ".safetensors"))


def _resolve_pretrained(name: str) -> str:
    """The folder or hub id to give transformers; a UserError when it cannot resolve locally."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"model path {name} is not a Hugging Face model folder (no config.json in it)")
        return str(path)
    if _looks_like_path(name):
        raise UserError(f"model path not found: {name}")
    return name


def _load_pretrained(source: str, cfg: ModelConfig, dtype: torch.dtype):
    remote = {"trust_remote_code": True} if cfg.trust_remote_code else {}
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True, **remote)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model {source!r} is not a registered name ({', '.join(REGISTERED_MODELS)}), not a local folder, "
            f"and not in the local Hugging Face cache (nothing is downloaded at run time): {str(err).splitlines()[0]}"
        ) from err
    _apply_overrides(config, cfg.overrides, source)
    model = AutoModelForCausalLM.from_pretrained(
        source, config=config, dtype=dtype, local_files_only=True, weights_only=True, **remote
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **remote)
    except (OSError, ValueError) as err:
        raise UserError(f"model {source!r} has no loadable tokenizer: {str(err).splitlines()[0]}") from err
    return model, tokenizer


def _apply_overrides(config, overrides: dict[str, Any], source: str) -> None:
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise UserError(f"model.overrides: unknown key(s) {unknown} for {source}; valid keys include {sorted(config.to_dict())}")
    for key, value in overrides.items():
        setattr(config, key, value)


def _ensure_pad_token(model, tokenizer) -> None:
    """Padding needs a pad id; fall back to eos (labels mask padding by position, not by id)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_model(cfg: ModelConfig, device: Optional[Union[str, torch.device]] = None):
    """Load `(model, tokenizer)` for `cfg`.

    The model is a transformers causal LM in `cfg.dtype` (see `resolve_dtype`), on `device` when
    given (else on CPU), in eval mode as transformers leaves it; the tokenizer always has a pad token.
    """
    dtype = resolve_dtype(cfg.dtype, device)
    name = cfg.name_or_path
    if name in TINY_FAMILIES:
        model, tokenizer = build_tiny_model(name, cfg.overrides, cfg.seed, dtype)
    else:
        source = str(ensure_smollm2_folder()) if name == DEFAULT_MODEL else _resolve_pretrained(name)
        model, tokenizer = _load_pretrained(source, cfg, dtype)
    _ensure_pad_token(model, tokenizer)
    if device is not None:
        model.to(device)
    return model, tokenizer
