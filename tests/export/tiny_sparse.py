"""Tiny random Llama / Qwen3 models turned sparse with a hand-made plan and random indexers (export tests)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from rtpurbo_train.attention import attach_sparsity
from rtpurbo_train.export.hf_config import rtpurbo_section
from rtpurbo_train.export.remote_code import modeling_rtpurbo
from rtpurbo_train.models.byte_tokenizer import build_byte_tokenizer
from rtpurbo_train.plan import HeadLayout, SparsityPlan

CONFIGS = {"llama": LlamaConfig, "qwen3": Qwen3Config}
BLOCK = 16  # several query blocks at ~150 tokens; the kernels take power-of-two blocks >= 16


def tiny_config(family: str = "llama", *, layers: int = 3, heads: int = 4, kv_heads: int = 2, vocab: int = 259):
    return CONFIGS[family](vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
                           max_position_embeddings=4096, tie_word_embeddings=False,
                           # no EOS: greedy generation runs to max_new_tokens, like the reference loop
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)


def make_plan(config, retrieval=(1,), **settings) -> SparsityPlan:
    defaults = dict(block_size=BLOCK, sink_tokens=4, window=24, top_p=0.6)
    return SparsityPlan.uniform(HeadLayout.from_config(config), list(retrieval), **{**defaults, **settings})


def randomize_indexers(model, seed: int) -> None:
    """Independent random Wq per query head (the default init copies the group's Wk into every Wq)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".indexer." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def sparse_model(family: str = "llama", *, layers: int = 3, heads: int = 4, kv_heads: int = 2, retrieval=(1,),
                 seed: int = 0, **plan_settings):
    """(training-time sparse model, its runtime, plan, tokenizer)."""
    tokenizer = build_byte_tokenizer()
    config = tiny_config(family, layers=layers, heads=heads, kv_heads=kv_heads, vocab=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plan = make_plan(config, retrieval, **plan_settings)
    runtime = attach_sparsity(model, plan, backend="reference", seed=seed)
    randomize_indexers(model, seed + 1)
    return model, runtime, plan, tokenizer


def remote_model(*, layers: int = 2, heads: int = 4, kv_heads: int = 2, retrieval=(1,), seed: int = 0,
                 **plan_settings):
    """The exported sparse class (modeling_rtpurbo) built directly from a tiny Llama config, random indexers."""
    config = tiny_config("llama", layers=layers, heads=heads, kv_heads=kv_heads)
    config.rtpurbo = rtpurbo_section(make_plan(config, retrieval, **plan_settings))
    torch.manual_seed(seed)
    model = modeling_rtpurbo.RTPurboLlamaForCausalLM(config).eval()
    randomize_indexers(model, seed + 1)  # peaked indexer distributions: selections differ between rows
    return model


@torch.no_grad()
def training_logits(model, runtime, ids, mode: str) -> torch.Tensor:
    with runtime.use_mode(mode):
        return model(ids, use_cache=False).logits.float()


def load(path, sparse: bool):
    kwargs = {"trust_remote_code": True} if sparse else {}
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs).eval()


def random_ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))
