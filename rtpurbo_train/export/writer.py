"""`export_model`: a trained sparse model -> a Hugging Face folder that inference engines load.

Folder contents:
  config.json                       base architecture + `rtpurbo`, `headwise_config`, `auto_map` (hf_config.py)
  model*.safetensors (+ index)      base weights only, sharded past `max_shard_size`, LoRA merged
  rtpurbo_indexer.safetensors       `model.layers.{i}.self_attn.indexer.{wq,wk}.weight` (outside the base index)
  generation_config.json, tokenizer files, plan.json
  configuration_rtpurbo.py, cache_rtpurbo.py, decode_graph_rtpurbo.py, modeling_rtpurbo.py
                                    (sparse prefill/decode, CUDA-graph decode, trust_remote_code)
Weights are always written in the original head order (a sequence-parallel KV-head permutation is undone).
The folder is written next to `out_dir` under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError
from ..plan import SparsityPlan
from ..parallel.head_padding import strip_kv_heads
from .head_permutation import undo_kv_head_permutation
from .hf_config import add_rtpurbo_to_config
from .model_copy import merged_cpu_model
from .remote_code.configuration_rtpurbo import INDEXER_WEIGHTS_NAME

REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"
REMOTE_CODE_FILES = ("configuration_rtpurbo.py", "cache_rtpurbo.py", "decode_graph_rtpurbo.py", "modeling_rtpurbo.py")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UserError(f"export dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise UserError(f"{type(model).__name__} has no `model.layers[i].self_attn`: not a supported decoder")
    return [layer.self_attn for layer in layers]


def take_indexer_weights(attention: list[nn.Module], plan: SparsityPlan) -> dict[str, torch.Tensor]:
    """Indexer tensors by export name; removes the indexer modules from the (copied) model so the base
    weights hold none. A layer whose indexer is missing or has the wrong shape is a UserError."""
    d, D = plan.indexer_dim, plan.model.head_dim
    out = {}
    for i, attn in enumerate(attention):
        n_kv, n_q = len(plan.retrieval_kv_heads(i)), len(plan.retrieval_q_heads(i))
        indexer = getattr(attn, "indexer", None)
        if n_kv == 0:
            if indexer is not None:
                raise UserError(f"layer {i} has an indexer but the plan gives it no retrieval heads: plan and model disagree")
            continue
        if indexer is None:
            raise UserError(f"layer {i} has {n_kv} retrieval KV heads in the plan but the model has no indexer there: "
                            "attach the sparsity (attach_sparsity) and load the trained indexer weights before export")
        for name, shape in (("wq", (n_q, d, D)), ("wk", (n_kv, d, D))):
            weight = getattr(getattr(indexer, name, None), "weight", None)
            if weight is None or tuple(weight.shape) != shape:
                got = None if weight is None else tuple(weight.shape)
                raise UserError(f"layer {i}: indexer {name}.weight has shape {got}, the plan needs {shape}")
            if not torch.isfinite(weight).all():
                raise UserError(f"layer {i}: indexer {name}.weight has NaN/inf values")
            out[f"model.layers.{i}.self_attn.indexer.{name}.weight"] = weight.detach().clone()
        del attn.indexer
    return out


def _is_previous_export(path: Path) -> bool:
    if not any(path.iterdir()):
        return True
    config = path / "config.json"
    try:
        return "rtpurbo" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not out_dir.is_dir() or not _is_previous_export(out_dir):
        raise UserError(f"{out_dir} exists and is not an earlier export; refusing to replace it")
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _check_base_weights(folder: Path) -> None:
    """The base safetensors files and index must name no indexer tensor (plain loaders would warn)."""
    from safetensors import safe_open

    for file in folder.glob("model*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            leaked = [k for k in f.keys() if ".indexer." in k]
        if leaked:
            raise RuntimeError(f"internal error: indexer tensors {leaked[:3]} ended up in {file.name}")


def export_model(model, tokenizer, plan: SparsityPlan, out_dir, *, dtype="bfloat16", max_shard_size="2GB") -> Path:
    """Write the export folder for `model` (a transformers causal LM after `attach_sparsity`, possibly a
    peft model or DeepSpeed/DDP-wrapped; it is not modified) and return its path.

    `plan` must describe the model's heads; `tokenizer` is saved with it. `dtype`: bfloat16 / float16 /
    float32. `max_shard_size`: as transformers' `save_pretrained` (e.g. "2GB" or a number of bytes).
    """
    target_dtype = parse_dtype(dtype)
    if not isinstance(plan, SparsityPlan):
        raise UserError(f"export needs a SparsityPlan, got {type(plan).__name__}")
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise UserError("export needs the model's tokenizer (inference engines load it from the folder)")
    out_dir = Path(out_dir)

    copy = merged_cpu_model(model)
    try:
        plan.check_model(copy.config)
    except ValueError as err:
        raise UserError(f"export: {err}") from None
    attention = _attention_modules(copy)
    indexer = take_indexer_weights(attention, plan)
    if plan.kv_head_permutation is not None:
        undo_kv_head_permutation(attention, indexer, [plan.retrieval_kv_heads(i) for i in range(len(attention))],
                                 plan.kv_head_permutation, plan.model.group, plan.model.head_dim)
        plan = plan.model_copy(update={"kv_head_permutation": None})
    if plan.padded_kv_heads:  # zero heads added for sequence parallelism: the last ones, never retrieval heads
        strip_kv_heads(attention, copy.config, plan.padded_kv_heads, plan.model.group, plan.model.head_dim)
        plan = plan.without_padding()
    copy.to(target_dtype)
    indexer = {name: t.to(target_dtype).contiguous() for name, t in indexer.items()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        copy.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if indexer:
            save_file(indexer, str(tmp / INDEXER_WEIGHTS_NAME), metadata={"format": "pt"})
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
        add_rtpurbo_to_config(tmp / "config.json", plan)
        plan.save(tmp / "plan.json")
        _check_base_weights(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
