"""The `rtpurbo` attention function (registered in transformers' ALL_ATTENTION_FUNCTIONS) and
`attach_sparsity`, which turns a loaded Llama/Qwen2/Qwen3/Mistral causal LM into the sparse model.

Per layer: streaming KV heads attend to sink + sliding window; retrieval KV heads attend to the
64-token key blocks the indexer picks by top-p (plus sink and local blocks). One block-sparse kernel
call serves both kinds (per-KV-head window). Modes: `full` (dense causal), `sparse`, `both` (SSA:
both computed, one feeds o_proj, alignment loss recorded).

Training attention is causal and ignores `attention_mask`: exact for right padding, the only padding
the data pipeline produces (docs/DATA.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

import rtpurbo_kernels
from rtpurbo_kernels.block_sparse_attn.layout import merge_head_blocks, streaming_block_index

from ..losses.ssa_align import ssa_alignment_loss
from .indexer import Indexer
from .metrics import attention_recall, block_sparsity
from .rope import undo_rope
from .runtime import LayerSparsity, SparseRuntime

ATTENTION_NAME = "rtpurbo"


def _dense(query, key, value, scaling):
    """Causal SDPA on transformers' layout [B, H, T, D] -> [B, T, Hq, D]."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def rtpurbo_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] (RoPE'd) -> ([B, T, Hq, D], None).

    Under sequence parallelism this is Ulysses' core attention: T is the whole gathered sequence and
    the heads are this rank's slice (`runtime.layers` then holds the rank's local constants)."""
    runtime: SparseRuntime = module.rtpurbo_runtime
    layer: LayerSparsity = runtime.layer_on(module.layer_idx, query.device)
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("the training-time sparse model runs whole sequences without a KV cache; "
                           "use the exported model (modeling_rtpurbo.py) for cached decoding")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    path = runtime.path()
    need_sparse = runtime.mode in ("sparse", "both") or runtime.measure
    has_retrieval = layer.retrieval_kv.numel() > 0
    need_indexer = has_retrieval and (need_sparse or runtime.indexer_kl)

    out_full = _dense(query, key, value, scaling) if runtime.mode in ("full", "both") else None
    if runtime.indexer_kl and not has_retrieval and layer.has_indexer:
        # SP rank without this layer's retrieval heads: record a zero that still reaches the indexer
        # weights, so every rank produces the same gradients (ZeRO reduces them in lockstep).
        runtime.record("indexer_kl", layer.layer_idx, _indexer_zero(module.indexer))
    if not (need_sparse or need_indexer):
        return out_full, None

    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    plan = runtime.plan
    bs = plan.block_size
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)

    qi = ki = selection = None
    if need_indexer:
        cos, sin = _rope_for(module, runtime, query, kwargs)
        q_ret = query[:, layer.retrieval_q].detach()
        k_ret = key[:, layer.retrieval_kv].detach()
        q_pre = undo_rope(q_ret, cos, sin).transpose(1, 2)
        k_pre = undo_rope(k_ret, cos, sin).transpose(1, 2)
        qi, ki = module.indexer(q_pre, k_pre, layer.indexer_q_rows, layer.indexer_k_rows)
        if need_sparse:
            selection = rtpurbo_kernels.indexer_block_select(
                qi.detach(), ki.detach(), top_p=plan.top_p, top_k=plan.top_k, block_size=bs,
                sink_blocks=plan.sink_blocks, local_blocks=plan.retrieval_local_blocks, scale=module.indexer.scale,
                query_stride=plan.query_stride, backend=runtime.backend)
        if runtime.indexer_kl:
            sel_idx, sel_cnt = selection if (runtime.indexer_kl_selected_only and selection) else (None, None)
            kl = rtpurbo_kernels.indexer_kl_loss(
                q_ret.transpose(1, 2), k_ret.transpose(1, 2), qi, ki, sm_scale=scaling,
                scale=module.indexer.scale, block_idx=sel_idx, block_cnt=sel_cnt, block_size=bs,
                query_block_stride=runtime.indexer_kl_stride, backend=runtime.backend)
            runtime.record("indexer_kl", layer.layer_idx, kl * layer.kl_share)

    if not need_sparse:
        return out_full, None

    stream = streaming_block_index(T, plan.window, plan.sink_tokens, bs, query.device)  # cached per length
    idx, cnt = merge_head_blocks(stream, selection, layer.retrieval_kv, B, Hkv)
    kv_window = layer.kv_window
    out_sparse = None
    if runtime.mode in ("sparse", "both"):
        out_sparse, _ = rtpurbo_kernels.block_sparse_attention(
            q, k, value.transpose(1, 2), idx, cnt, kv_window=kv_window, sink_tokens=plan.sink_tokens,
            sm_scale=scaling, block_size=bs, backend=runtime.backend, return_lse=False)
    if runtime.mode == "both":
        runtime.record("ssa_align", layer.layer_idx, ssa_alignment_loss(out_full, out_sparse) * runtime.head_share)
    if runtime.measure:
        _record_metrics(runtime, layer, q, k, idx, cnt, kv_window, scaling)
    return (out_sparse if path == "sparse" else out_full), None


def _rope_for(module, runtime, query, kwargs):
    """cos/sin [B, T, D] for the T positions the attention function sees. Under sequence parallelism
    the decoder layer's cos/sin are the local shard's; Ulysses hands us the gathered `position_ids`,
    from which the model's own rotary embedding recomputes them for the whole sequence."""
    cos, sin = module.rtpurbo_rope
    if cos.shape[-2] == query.shape[2]:
        return cos, sin
    sp = runtime.sequence_parallel
    if sp is None or kwargs.get("position_ids") is None:
        raise RuntimeError(f"the layer's rotary embedding covers {cos.shape[-2]} positions but the attention "
                           f"sees {query.shape[2]}; sequence parallelism needs position_ids in the forward")
    return sp.rotary(query, kwargs["position_ids"])


def _indexer_zero(indexer) -> torch.Tensor:
    return (indexer.wq.weight.sum() + indexer.wk.weight.sum()).float() * 0.0


@torch.no_grad()
def _record_metrics(runtime, layer, q, k, idx, cnt, kv_window, scaling):
    plan, T, i = runtime.plan, q.shape[1], layer.layer_idx
    runtime.record("sparsity", i, block_sparsity(cnt, T, plan.block_size))
    if layer.streaming_kv.numel():
        runtime.record("sparsity_streaming", i, block_sparsity(cnt[:, layer.streaming_kv], T, plan.block_size))
    recall = attention_recall(q, k, idx, cnt, kv_window, plan.sink_tokens, scaling, plan.block_size, runtime.recall_queries)
    runtime.record("recall", i, recall.mean())
    if layer.retrieval_kv.numel():
        runtime.record("sparsity_retrieval", i, block_sparsity(cnt[:, layer.retrieval_kv], T, plan.block_size))
        runtime.record("recall_retrieval", i, recall[layer.retrieval_kv].mean())


def _stash_rope(module, args, kwargs):
    # The attention function does not receive cos/sin; the decoder layer passes them to self_attn.
    module.rtpurbo_rope = kwargs.get("position_embeddings")


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder-only model, in layer order (works through peft wrappers)."""
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no decoder self-attention modules with a layer_idx found")
    return sorted(mods, key=lambda m: m.layer_idx)


def attach_sparsity(model, plan, *, backend: str = "auto", seed: int = 0) -> SparseRuntime:
    """Add indexers and the `rtpurbo` attention to `model` in place; return the shared runtime.

    With `plan.kv_head_permutation` the model's q/k/v/o weights must already be in that slot order
    (`parallel.apply_kv_head_permutation`); the runtime and the indexer rows then use slot numbers.

    Indexers start from a random sketch (see `Indexer.reset_parameters`) seeded by `seed`.
    """
    plan.check_model(model.config)
    # A global registration; sequence parallelism wraps it with a local override of the same name
    # (parallel/ulysses.py), which this does not disturb.
    AttentionInterface.register(ATTENTION_NAME, rtpurbo_attention)
    runtime = SparseRuntime(plan=plan, backend=backend, ssa_seed=seed)
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    group = plan.model.group
    for module in attention_modules(model):
        i = module.layer_idx
        slot_of = _slot_of(plan, i)
        ret_kv = torch.tensor(sorted(slot_of[h] for h in plan.retrieval_kv_heads(i)), dtype=torch.long)
        ret_q = (ret_kv[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        window = torch.full((plan.model.num_kv_heads,), plan.window, dtype=torch.int32)
        window[ret_kv] = 0
        streaming = torch.tensor([h for h in range(plan.model.num_kv_heads) if h not in set(ret_kv.tolist())], dtype=torch.long)
        runtime.layers[i] = LayerSparsity(i, ret_kv, ret_q, streaming, window)
        if ret_kv.numel() and not hasattr(module, "indexer"):
            indexer = Indexer(len(plan.retrieval_q_heads(i)), ret_kv.numel(), plan.model.head_dim, plan.indexer_dim)
            indexer.reset_parameters(gen)
            _rows_to_slot_order(indexer, plan.retrieval_kv_heads(i), slot_of, group)
            module.indexer = indexer.to(device=param.device, dtype=torch.float32)
        module.rtpurbo_runtime = runtime
        if not getattr(module, "_rtpurbo_hooked", False):
            module.register_forward_pre_hook(_stash_rope, with_kwargs=True)
            module._rtpurbo_hooked = True
    _set_attention(model, ATTENTION_NAME)
    return runtime


def _slot_of(plan, layer: int) -> list[int]:
    """slot_of[h] = the slot of original KV head h in the model's weights (plan.kv_head_permutation)."""
    perm = plan.kv_head_permutation
    if perm is None:
        return list(range(plan.model.num_kv_heads))
    slot_of = [0] * plan.model.num_kv_heads
    for slot, head in enumerate(perm[layer]):
        slot_of[head] = slot
    return slot_of


@torch.no_grad()
def _rows_to_slot_order(indexer, retrieval: list[int], slot_of: list[int], group: int) -> None:
    """The random init draws rows for the retrieval heads in original order; store them in slot order
    so a permuted model starts from exactly the permuted copy of the unpermuted model's indexer."""
    order = torch.tensor(sorted(range(len(retrieval)), key=lambda r: slot_of[retrieval[r]]), dtype=torch.long)
    if torch.equal(order, torch.arange(len(retrieval))):
        return
    q_order = (order[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
    indexer.wk.weight.copy_(indexer.wk.weight.index_select(0, order))
    indexer.wq.weight.copy_(indexer.wq.weight.index_select(0, q_order))


def _set_attention(model, name: str) -> None:
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.set_attn_implementation(name)
    if target.config._attn_implementation != name:
        raise RuntimeError(f"could not switch {type(target).__name__} to the {name!r} attention")


def indexer_parameters(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".indexer." in n]
