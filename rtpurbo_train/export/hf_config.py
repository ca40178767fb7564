"""What export adds to the base model's config.json.

- `rtpurbo`: the sparsity plan and the selection constants the training-time attention used
  (read back by remote_code/configuration_rtpurbo.py).
- `headwise_config`: RTP-LLM's per-query-head flags (`"0": [0/1 per query head], ...`) and
  `sink_token_num` / `swa_token_num` / `seqlen_threshold` (it has no field for the window the retrieval
  heads keep: `rtpurbo.local_blocks` and `rtpurbo.plan.retrieval_window` carry it).
- `auto_map` for `AutoModelForCausalLM` ONLY. `model_type` and `architectures` stay the base model's, and
  there is no `AutoConfig` entry, so `AutoConfig` always returns the base config class: without
  `trust_remote_code` every loader (transformers, vLLM, SGLang) sees the plain base model; with it,
  `AutoModelForCausalLM` picks `modeling_rtpurbo.RTPurbo<Arch>`, a subclass of the base class that uses
  the same config class. (transformers 5 does not register a remote class for a native config class, so
  a later plain load in the same process still gets the base class.)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..plan import SparsityPlan
from .remote_code.configuration_rtpurbo import RTPURBO_FORMAT
# Keys transformers may serialise that would pin the training-time attention function.
_ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                   "_attn_implementation_autoset")


def rtpurbo_section(plan: SparsityPlan) -> dict:
    return {
        "format": RTPURBO_FORMAT,
        "plan": plan.model_dump(),
        # the selection constants the training attention uses (rtpurbo_train/attention/dispatch.py)
        "sink_blocks": plan.sink_blocks,
        "local_blocks": plan.retrieval_local_blocks,
        "indexer_scale": 1.0 / math.sqrt(plan.indexer_dim),
    }


def headwise_config(plan: SparsityPlan) -> dict:
    out: dict = {"sink_token_num": plan.sink_tokens, "swa_token_num": plan.window,
                 "seqlen_threshold": plan.seqlen_threshold}
    for i, flags in enumerate(plan.headwise_flags()):
        out[str(i)] = flags
    return out


def base_architecture(config_dict: dict) -> str:
    archs = config_dict.get("architectures") or []
    if len(archs) != 1:
        raise ValueError(f"config.json architectures {archs!r}: expected exactly one causal-LM class")
    arch = archs[0]
    # Re-exporting a model loaded with trust_remote_code: name the base class, not the RTPurbo subclass.
    return arch[len("RTPurbo"):] if arch.startswith("RTPurbo") else arch


def add_rtpurbo_to_config(config_path: Path, plan: SparsityPlan) -> dict:
    """Rewrite config.json in place; returns the new dict."""
    data = json.loads(config_path.read_text())
    arch = base_architecture(data)
    data["architectures"] = [arch]
    for key in _ATTENTION_KEYS:
        data.pop(key, None)
    data["auto_map"] = {"AutoModelForCausalLM": f"modeling_rtpurbo.RTPurbo{arch}"}
    data["rtpurbo"] = rtpurbo_section(plan)
    data["headwise_config"] = headwise_config(plan)
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data
