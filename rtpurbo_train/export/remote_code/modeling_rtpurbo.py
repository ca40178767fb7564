"""RTPurbo sparse attention for an exported Llama / Qwen2 / Qwen3 / Mistral model (`trust_remote_code=True`).

Shipped inside every export folder. Imports only torch and transformers (plus `rtpurbo_kernels` for the
Triton kernels, when installed and the tensors are on CUDA). The model class is the base architecture's
own class (`RTPurboLlamaForCausalLM` subclasses `LlamaForCausalLM`, same weight names, same config
class) with every self-attention module switched to the sparse attention below and an indexer added on
layers that have retrieval heads. Without `trust_remote_code` the same folder loads as the plain model.

Semantics (docs/INTERFACES.md of rtpurbo-train; identical to the training-time sparse model). For query
i and key j (absolute positions), block size bs:
- streaming KV heads: j <= i and (i - j < window or j < sink_tokens);
- retrieval KV heads: qi = Wq q_pre, ki = Wk k_pre (pre-RoPE, per head), p_m = softmax_{n<=m}(scale qi_m.ki_n);
  mass[qb, kb] = mean over the sampled queries m of query block qb and the G query heads of the group of
  sum_{n in kb} p_m(n), where the sampled queries are m % query_stride == query_stride - 1 and the block's
  last existing query (query_stride 1: every query); chosen = smallest prefix of the blocks kb <= qb sorted by mass (desc,
  ties by index) whose sum reaches top_p (or the top_k heaviest), plus sink and local blocks; query i
  sees key j iff j <= i and j // bs is chosen for i // bs;
- softmax attention over the visible keys with the model's `scaling`, then o_proj.
Dense (plain causal) attention when the prompt is shorter than `seqlen_threshold` (> 0). Such prompts may also
use a stock transformers cache (`generate(..., cache_implementation="static")`): the plain model's own path,
which transformers compiles as it does for the plain load.

Decoding: the cache (cache_rtpurbo.py) keeps only sink + window tokens on streaming heads. A decoded
token's selection averages the mass of the strided queries of its query block seen so far (accumulated
in the cache) and its own, which is what a no-cache forward over the whole sequence computes for a
last, partial block. (Tokens decoded earlier in that block saw other sampled block-mates than a later
no-cache forward gives them, so their hidden states, and so later layers' inputs, may differ slightly.)
A decode step (one token, cache present) runs only fixed-shape tensor ops, so the host never waits for
the device: the retrieval heads score every cached indexer key, choose blocks by sort/cumsum/scatter and
attend to the whole cache under a token mask (no gather of the chosen blocks); the streaming heads attend
to their sink + window buffer. Prefill and multi-token steps take the chunked path below.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from .cache_rtpurbo import RTPurboCache
from .decode_graph_rtpurbo import DecodeGraphs
from .configuration_rtpurbo import INDEXER_WEIGHTS_NAME, RTPurboSparsityConfig

# float32 score elements one chunk of query rows may hold (the PyTorch path never builds T x T per head).
SCORE_ELEMENTS_PER_CHUNK = 1 << 25
BACKENDS = ("auto", "torch", "kernels")


# ---- indexer ------------------------------------------------------------------------------------------
class HeadwiseProjection(nn.Module):
    """One [d, D] matrix per head: x [B, H, T, D] -> [B, H, T, d] (weight [H, d, D])."""

    def __init__(self, num_heads: int, out_dim: int, in_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, out_dim, in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtD,hdD->bhtd", x, self.weight.to(x.dtype))


class RTPurboIndexer(nn.Module):
    """Wq per retrieval query head [Hq_r, d, D], Wk per retrieval KV head [Hkv_r, d, D]."""

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dim: int):
        super().__init__()
        self.wq = HeadwiseProjection(num_q_heads, dim, head_dim)
        self.wk = HeadwiseProjection(num_kv_heads, dim, head_dim)


# ---- block selection (PyTorch) ----------------------------------------------------------------------------
def select_blocks(mass: torch.Tensor, q_blocks: torch.Tensor, s: RTPurboSparsityConfig) -> torch.Tensor:
    """mass float32 [B, H, n, NKB] of query blocks `q_blocks` (absolute; [n], or any shape that broadcasts
    to [B, H, n], e.g. [B, 1, 1] for one decode step per row) -> chosen bool [B, H, n, NKB].

    Entries kb > qb are ignored. The rule of `rtpurbo_kernels.indexer_block_select`: the sink blocks and the
    local blocks (the retrieval window) are forced; top-p keeps the smallest prefix of the other causal
    blocks sorted by mass (descending, stable) whose sum reaches top_p of their total (the heaviest always),
    top-k the top_k heaviest of them; top_p >= 1 keeps every causal block.
    """
    nkb = mass.shape[-1]
    kb = torch.arange(nkb, device=mass.device)
    qb = q_blocks[..., None]
    causal = kb <= qb  # [n, NKB] (or [B, 1, 1, NKB])
    if s.top_k is None and s.top_p >= 1.0:
        return causal.expand(mass.shape)
    forced = causal & ((kb < s.sink_blocks) | (kb > qb - s.local_blocks))
    candidate = causal & ~forced
    vals, order = torch.sort(torch.where(candidate, mass.float(), float("-inf")), dim=-1, descending=True,
                             stable=True)
    in_candidates = kb < candidate.sum(dim=-1, keepdim=True)  # sorted position r holds a candidate
    if s.top_k is not None:
        keep = in_candidates & (kb < s.top_k)
    else:
        vals = torch.where(in_candidates, vals, 0.0)
        mass_before = torch.cumsum(vals, dim=-1) - vals
        keep = in_candidates & ((mass_before < s.top_p * vals.sum(dim=-1, keepdim=True)) | (kb == 0))
    kept = torch.zeros(mass.shape, dtype=torch.bool, device=mass.device).scatter_(-1, order, keep.expand(mass.shape))
    return kept | forced


def indexer_block_sums(qi: torch.Tensor, ki: torch.Tensor, start: int, scale: float, block_size: int,
                       query_stride: int = 1):
    """Indexer mass of the sampled query rows among positions start .. start+R-1, summed per query block.

    qi [B, Hr, G, R, d] (query heads grouped by KV head), ki [B, Hr, N, d] keys 0..N-1 with
    N = start + R. The sampled rows are the strided ones, m % query_stride == query_stride - 1 (every row
    for 1), which later tokens never change. Returns (sums float32 [B, Hr, nqb, NKB] = sum over the
    block's strided rows and the G heads of each row's mass per key block, rows int [nqb] = strided rows
    per block, tail float32 [B, Hr, NKB] = the mass of the last row start+R-1 when it is not strided, else
    None); nqb counts the blocks the rows touch. A block's selection averages its strided rows and, for
    the block that ends the sequence, also its last row (the tail).
    """
    B, Hr, G, R, d = qi.shape
    N = ki.shape[2]
    bs = block_size
    S = query_stride
    last = start + R - 1
    if S > 1:  # score only the sampled rows: strided ones and the last
        keep = [m - start for m in range(start, start + R) if m % S == S - 1 or m == last]
        rows_at = torch.tensor(keep, device=qi.device)
        qi = qi.index_select(3, rows_at)
    else:
        rows_at = torch.arange(R, device=qi.device)
    n = qi.shape[3]
    scores = torch.matmul(qi.float().reshape(B, Hr, G * n, d), ki.float().transpose(-1, -2)) * scale
    scores = scores.view(B, Hr, G, n, N)
    q_pos = rows_at + start
    k_pos = torch.arange(N, device=qi.device)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # every row sees its own key
    nkb = -(-N // bs)
    probs = F.pad(probs, (0, nkb * bs - N)).view(B, Hr, G, n, nkb, bs).sum(-1).sum(2)  # [B, Hr, n, nkb]
    tail = None
    if last % S != S - 1:
        tail, probs, rows_at = probs[:, :, -1], probs[:, :, :-1], rows_at[:-1]
    lead = start % bs
    nqb = -(-(lead + R) // bs)
    slot = rows_at + lead  # row position within the padded span of whole blocks
    dense_rows = probs.new_zeros(B, Hr, nqb * bs, nkb).index_copy_(2, slot, probs)
    sums = dense_rows.view(B, Hr, nqb, bs, nkb).sum(3)
    first = start // bs
    edges = [(first + j) * bs for j in range(nqb + 1)]
    # strided rows of [lo, hi): m % S == S - 1
    rows = [min(hi, start + R) // S - max(lo, start) // S for lo, hi in zip(edges[:-1], edges[1:])]
    return sums, rows, tail


# ---- attention over chosen keys (PyTorch) ------------------------------------------------------------------
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
    """q [B, H, G, R, D], k/v [B, H, N, D], visible bool [B|1, H|1, R, N] -> float32 [B, H, G, R, D].

    Softmax in float32; a row that sees nothing gets 0 (never NaN)."""
    B, H, G, R, D = q.shape
    scores = torch.matmul(q.float().reshape(B, H, G * R, D), k.float().transpose(-1, -2)) * scaling
    scores = scores.view(B, H, G, R, -1).masked_fill(~visible[:, :, None], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    probs = probs / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(probs.view(B, H, G * R, -1), v.float()).view(B, H, G, R, D)


def _chunks(start: int, end: int, rows: int, block_size: int):
    """[a, b) query-row ranges covering start..end, each ending on a block boundary (or at end)."""
    a = start
    while a < end:
        b = min(end, (a // block_size) * block_size + rows)
        yield a, b
        a = b


def _rows_per_chunk(batch_heads: int, keys: int, block_size: int, keys_grow_with_rows: bool = False) -> int:
    """Query rows per chunk so that batch_heads * rows * keys score elements fit the budget (a multiple of
    the block size, at least one block). When each chunk also reads its own rows as keys (streaming
    heads: sink + window + the chunk), rows are also capped at sqrt(budget / batch_heads)."""
    budget = SCORE_ELEMENTS_PER_CHUNK // max(1, batch_heads)
    rows = budget // max(1, keys)
    if keys_grow_with_rows:
        rows = min(rows, math.isqrt(budget))
    return max(block_size, rows // block_size * block_size)


def streaming_attention(q, k, v, k_pos, start, s: RTPurboSparsityConfig, scaling):
    """Sink + window heads. q [B, Hs, G, T, D] at positions start..; k/v [B, Hs, L, D] at `k_pos` [L]
    (any order). Each chunk of rows gathers only the keys it can see. -> float32 [B, Hs, G, T, D]."""
    B, Hs, G, T, D = q.shape
    rows = _rows_per_chunk(B * Hs * G, s.sink_tokens + s.window, s.block_size, keys_grow_with_rows=True)
    outs = []
    for a, b in _chunks(start, start + T, rows, s.block_size):
        near = ((k_pos < s.sink_tokens) | (k_pos > a - s.window)) & (k_pos < b)
        idx = near.nonzero().squeeze(1)
        pos = k_pos.index_select(0, idx)
        q_pos = torch.arange(a, b, device=q.device)
        dist = q_pos[:, None] - pos[None, :]
        visible = (dist >= 0) & ((dist < s.window) | (pos[None, :] < s.sink_tokens))
        outs.append(attend(q[:, :, :, a - start:b - start], k.index_select(2, idx), v.index_select(2, idx),
                           visible[None, None], scaling))
    return torch.cat(outs, dim=3)


def retrieval_attention(q, k, v, qi, ki, start, carry, s: RTPurboSparsityConfig, scaling):
    """Indexer-selected blocks. q [B, Hr, G, T, D] and qi [B, Hr, G, T, d] at positions start..start+T-1;
    k/v [B, Hr, N, D], ki [B, Hr, N, d] for positions 0..N-1 (N = start + T).
    `carry` = (sums [B, Hr, nkb], rows) of the strided rows already seen in the query block holding `start`
    (decode), or None. Returns (out float32 [B, Hr, G, T, D], carry for the last block if it is unfinished,
    else None).
    """
    B, Hr, G, T, D = q.shape
    bs, end = s.block_size, start + T
    rows = _rows_per_chunk(B * Hr * G, end, bs)
    outs, new_carry = [], None
    for a, b in _chunks(start, end, rows, bs):
        sums, counts, tail = indexer_block_sums(qi[:, :, :, a - start:b - start], ki[:, :, :b], a, s.indexer_scale,
                                                bs, s.query_stride)
        if carry is not None and a == start:
            width = min(carry[0].shape[-1], sums.shape[-1])  # a decode step's carry spans the whole cache
            sums[:, :, 0, :width] += carry[0][..., :width]
            counts[0] += carry[1]
        first = a // bs
        q_blocks = torch.arange(first, first + len(counts), device=q.device)
        picked, rows = sums, list(counts)
        if tail is not None:  # the sequence's last row, not a strided one: its block's selection adds it
            picked = sums.clone()
            picked[:, :, -1] += tail
            rows[-1] += 1
        denom = torch.tensor(rows, dtype=torch.float32, device=q.device) * G
        chosen = select_blocks(picked / denom[:, None], q_blocks, s)  # [B, Hr, nqb, nkb]
        q_pos = torch.arange(a, b, device=q.device)
        k_pos = torch.arange(b, device=q.device)
        visible = chosen[:, :, q_pos // bs - first][..., k_pos // bs] & (k_pos[None, :] <= q_pos[:, None])
        outs.append(attend(q[:, :, :, a - start:b - start], k[:, :, :b], v[:, :, :b], visible, scaling))
        if b == end and end % bs:
            new_carry = (sums[:, :, -1], counts[-1])
    return torch.cat(outs, dim=3), new_carry


def dense_attention(q, k, v, start, scaling):
    """Plain causal attention. q [B, Hq, T, D] at positions start..; k/v [B, Hkv, start + T, D]."""
    T, N = q.shape[2], k.shape[2]
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    mask = torch.arange(N, device=q.device)[None, :] <= torch.arange(start, start + T, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)


# ---- one decode step (one new token per row, cache present): fixed shapes, no host sync ----------------------
def retrieval_decode_choice(qi: torch.Tensor, ikeys: torch.Tensor, pos: torch.Tensor, carry: torch.Tensor,
                            s: RTPurboSparsityConfig):
    """The key blocks the token at position pos[b] sees on each retrieval head, over the whole cache.

    qi [B, Hr, G, d]; ikeys float32 [B, Hr, C, d] (slot n = position n; slots past pos are ignored);
    carry float32 [B, Hr, C // bs] = the summed mass of the earlier strided queries (m % S == S - 1) of
    t's query block (read only when t is not the first row of its block). t's selection averages those
    and t itself: the no-cache rule for a sequence's last row. Returns (chosen bool [B, Hr, C // bs],
    new carry float32 [B, Hr, C // bs]). `rtpurbo_kernels.decode_block_select` computes the same."""
    B, Hr, G, _ = qi.shape
    C, bs, S = ikeys.shape[2], s.block_size, s.query_stride
    scores = torch.matmul(qi.float(), ikeys.transpose(-1, -2)) * s.indexer_scale  # [B, Hr, G, C]
    t = pos.view(B, 1, 1, 1)
    scores = scores.masked_fill(torch.arange(C, device=qi.device) > t, float("-inf"))
    own = torch.softmax(scores, dim=-1).view(B, Hr, G, C // bs, bs).sum(dim=(2, 4))  # [B, Hr, NKB]
    t = pos.view(B, 1, 1)
    base = torch.where(t % bs == 0, 0.0, carry)  # a new block starts with no earlier rows
    mass = (base + own) / (((t % bs) // S + 1) * G)
    chosen = select_blocks(mass[:, :, None], (pos // bs).view(B, 1, 1), s)[:, :, 0]
    return chosen, torch.where(t % S == S - 1, base + own, base)


# ---- the kernel path (rtpurbo_kernels on CUDA) -----------------------------------------------------------------
def _kernels():
    """The installed `rtpurbo_kernels` package, or None."""
    if importlib.util.find_spec("rtpurbo_kernels") is None:
        return None
    return importlib.import_module("rtpurbo_kernels")


def kernel_prefill(kern, q, k, v, qi, ki, heads: "LayerHeads", s: RTPurboSparsityConfig, scaling, backend):
    """Whole-prompt sparse attention with `rtpurbo_kernels`: the selection kernel for the retrieval heads,
    one block index for the layer (the cached streaming rows merged with the selection) and one
    block-sparse call for every head. A fixed sequence of launches with no host sync.
    q [B, Hq, T, D], k/v [B, Hkv, T, D]; qi [B, Hr, G, T, d], ki [B, Hr, T, d] or None -> [B, Hq, T, D]."""
    B, Hkv, T, _ = k.shape
    stream = kern.streaming_block_index(T, s.window, s.sink_tokens, s.block_size, q.device)
    ret = heads.index("kv", q.device)
    selection = None
    if qi is not None:
        Hr, G, d = qi.shape[1], qi.shape[2], qi.shape[-1]
        qi_t = qi.permute(0, 3, 1, 2, 4).reshape(B, T, Hr * G, d)
        selection = kern.indexer_block_select(
            qi_t, ki.transpose(1, 2), top_p=s.top_p, top_k=s.top_k, block_size=s.block_size,
            sink_blocks=s.sink_blocks, local_blocks=s.local_blocks, scale=s.indexer_scale,
            query_stride=s.query_stride, backend=backend)
    idx, cnt = kern.merge_head_blocks(stream, selection, ret, B, Hkv)
    kv_window = heads.kv_window(s.window, q.device)
    out, _ = kern.block_sparse_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), idx, cnt, kv_window=kv_window,
        sink_tokens=s.sink_tokens, sm_scale=scaling, block_size=s.block_size, backend=backend)
    return out.transpose(1, 2)


# ---- the attention module -------------------------------------------------------------------------------------
@dataclass
class RTPurboOptions:
    """Model-wide switches, shared by every layer. `backend`: "auto" (rtpurbo_kernels on CUDA when
    installed, else PyTorch), "torch", or "kernels" (rtpurbo_kernels with its own device dispatch).
    `sparse=False` runs the same model densely (for comparisons). `cuda_graphs`: replay decode steps on
    CUDA from a recorded graph (decode_graph_rtpurbo.py); False decodes eagerly."""
    backend: str = "auto"
    sparse: bool = True
    cuda_graphs: bool = True


class LayerHeads:
    """The head split of one layer, as index tensors cached per device."""

    def __init__(self, settings: RTPurboSparsityConfig, layer: int):
        self.lists = {"kv": list(settings.retrieval_kv_heads[layer]), "q": settings.retrieval_q_heads(layer),
                      "stream_kv": settings.streaming_kv_heads(layer)}
        g = settings.group
        self.lists["stream_q"] = [h * g + j for h in self.lists["stream_kv"] for j in range(g)]
        # (first, count) of the kinds whose heads are consecutive: taken as views, not gathered
        self.spans = {name: (ids[0], len(ids)) for name, ids in self.lists.items()
                      if ids and ids == list(range(ids[0], ids[0] + len(ids)))}
        self._on: dict = {}

    def count(self, name: str) -> int:
        return len(self.lists[name])

    def index(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._on:
            self._on[key] = torch.tensor(self.lists[name], dtype=torch.long, device=device)
        return self._on[key]

    def kv_window(self, window: int, device) -> torch.Tensor:
        """int32 [Hkv]: `window` on streaming KV heads, 0 (no window) on retrieval heads."""
        key = ("kv_window", window, str(device))
        if key not in self._on:
            flags = torch.full((len(self.lists["kv"]) + len(self.lists["stream_kv"]),), window, dtype=torch.int32)
            flags[self.lists["kv"]] = 0
            self._on[key] = flags.to(device)
        return self._on[key]

    def take(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The heads `name` of x [B, H, ...] (a view when they are consecutive)."""
        if name in self.spans:
            return x.narrow(1, *self.spans[name])
        return x.index_select(1, self.index(name, x.device))

    def merge(self, stream: torch.Tensor | None, ret: torch.Tensor | None) -> torch.Tensor:
        """Query-head outputs [B, Hs*G, ...] and [B, Hr*G, ...] -> [B, Hq, ...] in head order."""
        if stream is None or ret is None:
            return ret if stream is None else stream
        if "stream_q" in self.spans and "q" in self.spans:
            first = [stream, ret] if self.spans["stream_q"][0] == 0 else [ret, stream]
            return torch.cat(first, dim=1)
        out = stream.new_empty(stream.shape[0], stream.shape[1] + ret.shape[1], *stream.shape[2:])
        out.index_copy_(1, self.index("stream_q", out.device), stream)
        return out.index_copy_(1, self.index("q", out.device), ret)


class RTPurboAttention(nn.Module):
    """Mixed into the base attention class (`RTPurboLlamaAttention(RTPurboAttention, LlamaAttention)`):
    reuses its projections, norms and RoPE; replaces the attention and the cache handling."""

    rtpurbo_settings: RTPurboSparsityConfig
    rtpurbo_heads: LayerHeads
    rtpurbo_options: RTPurboOptions
    _rtpurbo_base: type  # the base attention class (LlamaAttention, Qwen3Attention, ...)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if kwargs.get("rtpurbo_mode") == "dense" and not isinstance(past_key_values, RTPurboCache):
            # Dense without an RTPurbo cache (none, or a stock transformers cache): the base class's own
            # attention, op for op what a plain load runs (so the dense fallback is never slower than it).
            kwargs.pop("rtpurbo_mode")
            return self._rtpurbo_base.forward(self, hidden_states, position_embeddings, attention_mask,
                                              past_key_values, **kwargs)
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if hasattr(self, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q_pre, k_pre = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D]
        cos, sin = position_embeddings
        q_rot, k_rot = self._rtpurbo_apply_rope(q_pre, k_pre, cos, sin)

        cache = None
        if past_key_values is not None:
            if not isinstance(past_key_values, RTPurboCache):
                raise TypeError(f"the RTPurbo model needs an RTPurboCache (model.make_cache()), got {type(past_key_values).__name__}")
            cache = past_key_values.layers[self.layer_idx]
        start = cache.seen if cache is not None else 0
        if cache is not None and T == 1 and start > 0:
            pos = past_key_values.positions  # set by the causal LM; a bare attention call: every row at `start`
            pos = torch.full((B,), start, dtype=torch.long, device=q_rot.device) if pos is None else pos
            out = self._rtpurbo_decode(q_pre, k_pre, q_rot, k_rot, v, cache, pos, kwargs.get("rtpurbo_mode", "sparse"))
        elif kwargs.get("rtpurbo_mode", "sparse") == "dense":
            if cache is not None:
                k_rot, v = cache.append_full(k_rot, v)
            out = dense_attention(q_rot, k_rot, v, start, self.scaling)
        else:
            out = self._rtpurbo_sparse(q_pre, k_pre, q_rot, k_rot, v, cache, start)
        if cache is not None:
            cache.advance(T)
        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out), None

    def _rtpurbo_sparse(self, q_pre, k_pre, q, k, v, cache, start):
        """[B, H, T, D] inputs -> [B, Hq, T, D] (float32, or the model dtype for a decode step)."""
        s, heads = self.rtpurbo_settings, self.rtpurbo_heads
        B, Hq, T, D = q.shape
        G = s.group
        dev = q.device
        has_ret, has_stream = heads.count("kv") > 0, heads.count("stream_kv") > 0
        qi = ki_new = None
        if has_ret:
            qi = self.indexer.wq(heads.take(q_pre, "q")).view(B, heads.count("kv"), G, T, -1)
            ki_new = self.indexer.wk(heads.take(k_pre, "kv"))

        kern = self._rtpurbo_kernels(q)
        if kern is not None and start == 0:
            # The kernels' own "auto": Triton on CUDA, their PyTorch reference elsewhere.
            out = kernel_prefill(kern, q, k, v, qi, ki_new, heads, s, self.scaling, "auto")
            if cache is not None:
                self._rtpurbo_store_prefill(cache, k, v, qi, ki_new)
            return out.float()

        out = q.new_empty(B, Hq, T, D, dtype=torch.float32)
        if has_stream:
            s_q = heads.index("stream_q", dev)
            ks, vs = heads.take(k, "stream_kv"), heads.take(v, "stream_kv")
            if cache is not None:
                ks, vs, k_pos = cache.append_streaming(ks, vs)
            else:
                k_pos = torch.arange(T, device=dev)
            o = streaming_attention(q[:, s_q].view(B, -1, G, T, D), ks, vs, k_pos, start, s, self.scaling)
            out[:, s_q] = o.reshape(B, -1, T, D)
        if has_ret:
            ret_q = heads.index("q", dev)
            kr, vr, ki = heads.take(k, "kv"), heads.take(v, "kv"), ki_new
            carry = None
            if cache is not None:
                kr, vr = cache.append_full(kr, vr)
                ki = cache.append_indexer_keys(ki_new)
                if start % s.block_size and cache.block_mass is not None:
                    carry = (cache.block_mass, (start % s.block_size) // s.query_stride)
            o, carry = retrieval_attention(q[:, ret_q].view(B, -1, G, T, D), kr, vr, qi, ki, start, carry, s, self.scaling)
            out[:, ret_q] = o.reshape(B, -1, T, D)
            if cache is not None:
                cache.block_mass = None if carry is None else carry[0].clone()
        return out

    def _rtpurbo_decode(self, q_pre, k_pre, q, k, v, cache, pos, mode):
        """One new token per row at positions pos int64 [B] (device), with a cache: fixed shapes (the whole
        cache buffers), no host sync, no copy of cached tokens, so the step can be captured in a CUDA graph.
        q [B, Hq, 1, D], k/v [B, Hkv, 1, D] (rotated; q_pre/k_pre before RoPE) -> [B, Hq, 1, D] (q.dtype).
        Streaming heads: the sink + window ring buffer. Retrieval heads: indexer scores of every cached key
        -> block mass -> chosen blocks -> attention over the chosen blocks. Dense mode: every cached key."""
        s, heads = self.rtpurbo_settings, self.rtpurbo_heads
        B, _, _, D = q.shape
        kern = self._rtpurbo_kernels(q)
        if kern is not None and getattr(kern, "decode_attention", None) is None:
            kern = None  # an older rtpurbo_kernels without the decode kernels: the PyTorch step

        def attend_rows(qh, kh, vh, lengths, blocks=None):
            # qh [B, H, G, D]: a KV head's G query heads are G query rows over its keys kh/vh [B, H, C, D]
            if kern is not None:
                return kern.decode_attention(qh, kh, vh, lengths, blocks, block_size=s.block_size, scale=self.scaling)
            visible = torch.arange(kh.shape[2], device=q.device) < lengths.view(B, 1, 1)  # [B, 1, C]
            if blocks is not None:
                visible = visible & blocks.repeat_interleave(s.block_size, dim=-1)
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible[:, :, None], scale=self.scaling)

        if mode == "dense":
            kf, vf = cache.full_step(k, v, pos)
            return attend_rows(q.reshape(B, kf.shape[1], -1, D), kf, vf, pos + 1).reshape(B, -1, 1, D)
        stream = ret = None
        if heads.count("stream_kv"):
            ks, vs = cache.streaming_step(heads.take(k, "stream_kv"), heads.take(v, "stream_kv"), pos)
            qs = heads.take(q, "stream_q").reshape(B, ks.shape[1], -1, D)
            stream = attend_rows(qs, ks, vs, torch.clamp(pos + 1, max=ks.shape[2])).reshape(B, -1, 1, D)
        if heads.count("kv"):
            Hr = heads.count("kv")
            qi = self.indexer.wq(heads.take(q_pre, "q")).view(B, Hr, s.group, -1)  # [B, Hr, G, d]
            kr, vr = cache.full_step(heads.take(k, "kv"), heads.take(v, "kv"), pos)
            ikeys = cache.indexer_step(self.indexer.wk(heads.take(k_pre, "kv")), pos)
            carry = cache.carry_buffer(kr, kr.shape[2] // s.block_size)
            if kern is not None:
                chosen, new_carry = kern.decode_block_select(
                    qi, ikeys, pos, carry, block_size=s.block_size, top_p=s.top_p, top_k=s.top_k,
                    sink_blocks=s.sink_blocks, local_blocks=s.local_blocks, scale=s.indexer_scale,
                    query_stride=s.query_stride)
            else:
                chosen, new_carry = retrieval_decode_choice(qi, ikeys, pos, carry, s)
            carry.copy_(new_carry)
            qr = heads.take(q, "q").reshape(B, Hr, -1, D)
            ret = attend_rows(qr, kr, vr, pos + 1, chosen).reshape(B, -1, 1, D)
        return heads.merge(stream, ret)

    def _rtpurbo_store_prefill(self, cache, k, v, qi, ki):
        """After a kernel prefill: fill the cache as the PyTorch path would (trimmed streaming heads, full
        retrieval heads, indexer keys, and the mass of the last query block when it is unfinished)."""
        heads, s = self.rtpurbo_heads, self.rtpurbo_settings
        T = k.shape[2]
        if heads.count("stream_kv"):
            cache.append_streaming(heads.take(k, "stream_kv"), heads.take(v, "stream_kv"))
        if heads.count("kv"):
            cache.append_full(heads.take(k, "kv"), heads.take(v, "kv"))
            cache.append_indexer_keys(ki)
            cache.block_mass = None
            if T % s.block_size:
                a = T - T % s.block_size
                sums, rows, _ = indexer_block_sums(qi[:, :, :, a:], ki, a, s.indexer_scale, s.block_size,
                                                   s.query_stride)
                cache.block_mass = sums[:, :, -1].clone() if rows[-1] else None

    def _rtpurbo_kernels(self, q):
        backend = self.rtpurbo_options.backend
        if backend not in BACKENDS:
            raise ValueError(f"unknown rtpurbo backend {backend!r}; choose one of {BACKENDS}")
        if backend == "torch" or (backend == "auto" and not q.is_cuda):
            return None
        kern = _kernels()
        if kern is None and backend == "kernels":
            raise RuntimeError("rtpurbo backend 'kernels' needs the rtpurbo_kernels package (pip install rtpurbo-train)")
        return kern

    def _rtpurbo_apply_rope(self, q, k, cos, sin):
        # The base architecture's own RoPE function, so rotated q/k match the plain model bit for bit.
        rope = getattr(sys.modules[self._rtpurbo_base.__module__], "apply_rotary_pos_emb")
        return rope(q, k, cos, sin)


_ATTENTION_CLASSES: dict[type, type] = {}


def sparse_attention_class(base: type) -> type:
    if base not in _ATTENTION_CLASSES:
        _ATTENTION_CLASSES[base] = type(f"RTPurbo{base.__name__}", (RTPurboAttention, base), {"_rtpurbo_base": base})
    return _ATTENTION_CLASSES[base]


# ---- the causal LM -----------------------------------------------------------------------------------------------
def _left_padded_lengths(attention_mask):
    """Real-token count per row of a left-padded prompt batch, or None when no row is padded (one device
    read, at prefill only). Padding elsewhere than on the left is an error."""
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.bool().all()):
        return None
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    suffix = torch.arange(mask.shape[1], device=mask.device) >= (mask.shape[1] - lengths)[:, None]
    if not torch.equal(mask, suffix) or not bool((lengths > 0).all()):
        raise ValueError("the RTPurbo model takes left-padded batches only (each row: padding, then its tokens; "
                         "tokenizer.padding_side = 'left'), with at least one token per row")
    return lengths.tolist()


class RTPurboCausalLMMixin:
    """Turns a base `XxxForCausalLM` into the sparse model; see the module docstring."""

    _keys_to_ignore_on_load_missing = [r"\.self_attn\.indexer\."]

    def post_init(self):
        # Runs inside the base __init__, before weight init: the indexers then exist when weights are
        # initialised or materialised by from_pretrained.
        self._install_rtpurbo()
        super().post_init()

    def _install_rtpurbo(self) -> None:
        settings = RTPurboSparsityConfig.from_model_config(self.config)
        self.rtpurbo_settings = settings
        self.rtpurbo_options = RTPurboOptions()
        self._rtpurbo_graphs = DecodeGraphs()
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            if getattr(attn, "sliding_window", None):
                raise ValueError(f"layer {i} uses sliding-window attention, which RTPurbo models do not support")
            attn.__class__ = sparse_attention_class(type(attn))
            attn.rtpurbo_settings = settings
            attn.rtpurbo_heads = LayerHeads(settings, i)
            attn.rtpurbo_options = self.rtpurbo_options
            if settings.retrieval_kv_heads[i]:
                attn.indexer = RTPurboIndexer(len(settings.retrieval_q_heads(i)), len(settings.retrieval_kv_heads[i]),
                                              settings.head_dim, settings.indexer_dim)

    def _init_weights(self, module):
        if isinstance(module, HeadwiseProjection):
            nn.init.normal_(module.weight, std=(module.weight.shape[1] * module.weight.shape[2]) ** -0.25)
        else:
            super()._init_weights(module)

    # ---- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
                      if k in kwargs}
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model.load_indexer_weights(pretrained_model_name_or_path, **hub_kwargs)
        return model

    def load_indexer_weights(self, folder, **hub_kwargs) -> None:
        """Read `rtpurbo_indexer.safetensors` (kept out of the base index so plain loaders never see it)."""
        from safetensors.torch import load_file

        expected = {n: p for n, p in self.named_parameters() if ".self_attn.indexer." in n}
        if not expected:
            return
        path = os.path.join(str(folder), INDEXER_WEIGHTS_NAME)
        if not os.path.isfile(path):
            from transformers.utils import cached_file
            path = cached_file(str(folder), INDEXER_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is None or not os.path.isfile(path):
            raise ValueError(f"{folder}: {INDEXER_WEIGHTS_NAME} is missing; the plan has retrieval heads, so the "
                             "indexer weights are required")
        tensors = load_file(path)
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"{path}: indexer weights do not match the plan (missing {missing[:4]}, unexpected {extra[:4]})")
        with torch.no_grad():
            for name, param in expected.items():
                if tuple(tensors[name].shape) != tuple(param.shape):
                    raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}")
                param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Same layout as the export: indexer weights in their own file, never in the base weights."""
        from safetensors.torch import save_file

        full = self.state_dict()
        kwargs.setdefault("state_dict", {k: v for k, v in full.items() if ".self_attn.indexer." not in k})
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        indexer = {k: v.detach().contiguous() for k, v in full.items() if ".self_attn.indexer." in k}
        if indexer:
            save_file(indexer, os.path.join(str(save_directory), INDEXER_WEIGHTS_NAME), metadata={"format": "pt"})
        # transformers writes this class's name; plain engines must keep seeing the base architecture.
        config_path = os.path.join(str(save_directory), "config.json")
        with open(config_path) as f:
            data = json.load(f)
        data["architectures"] = [self._rtpurbo_base_name]
        with open(config_path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)

    # ---- running ------------------------------------------------------------------------------------------------
    def make_cache(self, reserve: int = 0) -> RTPurboCache:
        """An empty cache; `reserve` tokens (e.g. generate()'s max_length) size its first allocation."""
        s = self.rtpurbo_settings
        return RTPurboCache(s.num_layers, s.sink_tokens, s.window, block_size=s.block_size, reserve=reserve)

    def set_sparse(self, enabled: bool) -> None:
        """Sparse (default) or plain dense attention for the next sequences (a cache keeps its mode)."""
        self.rtpurbo_options.sparse = bool(enabled)

    def _rtpurbo_mode(self, cache, num_new: int) -> str:
        if cache is not None and cache.mode is not None:  # set by its prefill (or by the caller before it)
            return cache.mode
        threshold = self.rtpurbo_settings.seqlen_threshold
        dense = not self.rtpurbo_options.sparse or (threshold > 0 and num_new < threshold)
        mode = "dense" if dense else "sparse"
        if cache is not None:
            cache.mode = mode
        return mode

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        new = input_ids if input_ids is not None else inputs_embeds
        if past_key_values is not None and not isinstance(past_key_values, RTPurboCache):
            if self._rtpurbo_stock_cache_is_dense(past_key_values, new.shape[1]):
                # A stock transformers cache (e.g. generate(cache_implementation="static")): the plain model's
                # own path, dense, so transformers can compile it as it compiles the plain load.
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                       use_cache=use_cache, logits_to_keep=logits_to_keep, rtpurbo_mode="dense",
                                       **kwargs)
            past_key_values = None  # an empty DynamicCache before a sparse prompt: replaced by an RTPurbo cache
        if past_key_values is None and use_cache:
            past_key_values = self.make_cache()
        cache = past_key_values
        if cache is None or cache.get_seq_length() == 0:
            lengths = _left_padded_lengths(attention_mask)  # at prefill: later steps only append tokens
            if lengths is not None:
                return self._rtpurbo_prefill_rows(input_ids, inputs_embeds, lengths, cache, labels, logits_to_keep,
                                                  kwargs)
        else:
            # The RTPurbo attention never reads the mask; without it transformers builds none (and does not
            # sync with the device to check it for padding) on decode steps.
            attention_mask = None
            if new.shape[1] > 1 and cache.ragged:
                raise ValueError("a cache filled from a left-padded batch (rows of different lengths) takes one "
                                 "token per row per step; extend its rows one token at a time")
        mode = self._rtpurbo_mode(cache, new.shape[1])
        if cache is not None and new.shape[1] == 1 and cache.get_seq_length() > 0 and labels is None:
            kwargs.pop("cache_position", None)  # positions come from the cache (per row, on the device)

            def eager_step(ids, embeds=inputs_embeds):
                return self._rtpurbo_decode_forward(ids, embeds, cache, mode, logits_to_keep, kwargs)

            if self._rtpurbo_graphs_apply(new, inputs_embeds, kwargs):
                return self._rtpurbo_graphs.step(input_ids, cache, eager_step)
            return eager_step(input_ids)
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, inputs_embeds=inputs_embeds, labels=labels,
                              use_cache=use_cache, logits_to_keep=logits_to_keep, rtpurbo_mode=mode, **kwargs)
        if cache is not None:
            cache.set_lengths([cache.get_seq_length()] * new.shape[0], new.device)
        return out

    def _rtpurbo_stock_cache_is_dense(self, cache, num_new: int) -> bool:
        """Whether a stock (non-RTPurbo) cache runs the plain dense path. It holds full keys and values only, so
        it can: once it holds tokens (a dense prefill filled it), or before a prompt that runs dense anyway (below
        seqlen_threshold, or sparsity off). An empty DynamicCache before a sparse prompt is swapped for an
        RTPurbo cache (False); any other stock cache there is an error, since it cannot hold the sparse state."""
        # The mode first: it is host-side, while a StaticCache's length is a tensor (a branch torch.compile
        # cannot trace in the compiled decode step).
        if self._rtpurbo_mode(None, num_new) == "dense" or cache.get_seq_length() > 0:
            return True
        if type(cache) is transformers.DynamicCache:  # exactly: a subclass may keep state the swap would lose
            return False
        threshold = self.rtpurbo_settings.seqlen_threshold
        raise ValueError(f"a {num_new}-token prompt runs sparse attention (seqlen_threshold {threshold}), which needs the "
                         f"RTPurbo cache, not a {type(cache).__name__}: leave generate()'s cache_implementation "
                         "unset (or pass model.make_cache()); stock caches serve only prompts that run dense")

    def _rtpurbo_prefill_rows(self, input_ids, inputs_embeds, lengths, cache, labels, logits_to_keep, kwargs):
        """A left-padded prompt batch: each row runs alone on its own tokens (positions 0.., as if unbatched),
        then the rows' caches become one batch cache with per-row lengths. All rows take the attention mode
        of the longest row. Logits are right-aligned like the input (padding columns are 0)."""
        if labels is not None:
            raise ValueError("labels with a padded batch: run the rows one at a time")
        new = input_ids if input_ids is not None else inputs_embeds
        B, T = new.shape[:2]
        kwargs.pop("cache_position", None)  # the padded batch's; each row starts at position 0
        mode = self._rtpurbo_mode(None, max(lengths))
        row_caches, row_logits = [], []
        for b, n in enumerate(lengths):
            row_cache = None
            if cache is not None:
                row_cache = self.make_cache(reserve=cache.layers[0].reserve)
                row_cache.mode = mode
            ids = None if input_ids is None else input_ids[b:b + 1, T - n:]
            embeds = None if inputs_embeds is None else inputs_embeds[b:b + 1, T - n:]
            out = super().forward(input_ids=ids, inputs_embeds=embeds, past_key_values=row_cache,
                                  use_cache=cache is not None, logits_to_keep=logits_to_keep, rtpurbo_mode=mode,
                                  **kwargs)
            row_caches.append(row_cache)
            row_logits.append(out.logits[0])
        width = max(x.shape[0] for x in row_logits)
        logits = row_logits[0].new_zeros(B, width, row_logits[0].shape[-1])
        for b, x in enumerate(row_logits):
            logits[b, width - x.shape[0]:] = x
        if cache is not None:
            cache.adopt_rows(row_caches, mode)
        return type(out)(logits=logits, past_key_values=cache)

    def _rtpurbo_decode_forward(self, input_ids, inputs_embeds, cache, mode, logits_to_keep, kwargs):
        """One decode step: RoPE at each row's own position, then every row's position advances (in place,
        on the device: a recorded CUDA graph replays it)."""
        out = super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=cache.positions[:, None],
                              past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep, rtpurbo_mode=mode,
                              **kwargs)
        cache.positions.add_(1)
        return out

    def _rtpurbo_graphs_apply(self, new, inputs_embeds, kwargs) -> bool:
        """Replay decode steps from a CUDA graph (decode_graph_rtpurbo.py) when on CUDA, asked for, and the
        step returns only logits."""
        wants_more = any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states"))
        return (self.rtpurbo_options.cuda_graphs and new.is_cuda and inputs_embeds is None and not wants_more
                and not torch.cuda.is_current_stream_capturing())

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # An asked-for cache_implementation (e.g. "static") gets transformers' own cache: it serves prompts that
        # run dense (forward checks), as on the plain load. Otherwise the RTPurbo cache.
        no_cache_asked = generation_config.cache_implementation is None
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False and no_cache_asked:
            model_kwargs["past_key_values"] = self.make_cache(reserve=generation_config.max_length or 0)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


_CAUSAL_LM_CLASSES: dict[type, type] = {}


def sparse_causal_lm_class(base: type) -> type:
    """`RTPurbo<Base>` for a transformers causal-LM class with `model.layers[i].self_attn`."""
    if base not in _CAUSAL_LM_CLASSES:
        _CAUSAL_LM_CLASSES[base] = type(f"RTPurbo{base.__name__}", (RTPurboCausalLMMixin, base),
                                        {"__module__": __name__, "_rtpurbo_base_name": base.__name__})
    return _CAUSAL_LM_CLASSES[base]


RTPurboLlamaForCausalLM = sparse_causal_lm_class(transformers.LlamaForCausalLM)
RTPurboQwen2ForCausalLM = sparse_causal_lm_class(transformers.Qwen2ForCausalLM)
RTPurboQwen3ForCausalLM = sparse_causal_lm_class(transformers.Qwen3ForCausalLM)
RTPurboMistralForCausalLM = sparse_causal_lm_class(transformers.MistralForCausalLM)


def __getattr__(name: str):
    # Other RoPE GQA decoders with the same module layout: `RTPurbo<Arch>` built on first use.
    if name.startswith("RTPurbo") and name.endswith("ForCausalLM"):
        base = getattr(transformers, name[len("RTPurbo"):], None)
        if base is not None:
            return sparse_causal_lm_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
