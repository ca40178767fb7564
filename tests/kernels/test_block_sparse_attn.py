"""Block-sparse attention: the PyTorch reference against an independent brute force and SDPA, and the
Triton kernels (run by the Triton interpreter on CPU) against the reference, outputs and gradients."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rtpurbo_kernels.block_sparse_attn import (block_index_from_mask, block_sparse_attention,
                                               block_sparse_attention_reference, check_block_index_values,
                                               streaming_block_mask)
from rtpurbo_kernels.layout import mask_from_block_index


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the Triton kernels write starts as NaN, so an unwritten element shows up."""
    from rtpurbo_kernels.block_sparse_attn import triton_common
    monkeypatch.setattr(triton_common, "POISON_OUTPUTS", True)


def random_selection(batch, num_kv_heads, seq_len, density, gen, block_size=64, drop_own_block=False):
    """Random causal block selection (each causal block kept with probability `density`, the own
    block always kept unless drop_own_block) in the contract's layout."""
    num_blocks = math.ceil(seq_len / block_size)
    keep = torch.rand(batch, num_kv_heads, num_blocks, num_blocks, generator=gen) < density
    diagonal = torch.eye(num_blocks, dtype=torch.bool)
    keep = (keep | diagonal) & torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()
    if drop_own_block:
        keep[..., 0, :] = False                          # query block 0 sees nothing at all
        keep[..., -1, -1] = False                        # last block: only earlier blocks (maybe none)
    block_idx, block_cnt = block_index_from_mask(keep)
    return block_idx, block_cnt


def make_inputs(batch, seq_len, num_kv_heads, group, head_dim, gen, dtype=torch.float32):
    q = torch.randn(batch, seq_len, num_kv_heads * group, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seq_len, num_kv_heads, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seq_len, num_kv_heads, head_dim, generator=gen, dtype=dtype)
    do = torch.randn(batch, seq_len, num_kv_heads * group, head_dim, generator=gen, dtype=dtype)
    return q, k, v, do


def brute_force_attention(q, k, v, block_idx, block_cnt, kv_window, sink_tokens, sm_scale, block_size=64):
    """Dense float64 softmax attention under a mask built pair by pair from the contract's wording."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    num_blocks = math.ceil(seq_len / block_size)
    chosen = torch.zeros(batch, num_kv_heads, num_blocks, num_blocks, dtype=torch.bool)
    for b, h, qb in itertools.product(range(batch), range(num_kv_heads), range(num_blocks)):
        chosen[b, h, qb, block_idx[b, h, qb, :block_cnt[b, h, qb]].long()] = True
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    allowed = torch.zeros(batch, num_kv_heads, seq_len, seq_len, dtype=torch.bool)
    for b, h in itertools.product(range(batch), range(num_kv_heads)):
        in_block = chosen[b, h][i // block_size, j // block_size]
        rule = (j <= i) & in_block
        if kv_window is not None and int(kv_window[h]) > 0:
            rule &= (i - j < int(kv_window[h])) | (j < sink_tokens)
        allowed[b, h] = rule
    allowed = allowed.repeat_interleave(group, dim=1)                           # [B, Hq, T, T]
    qh = q.double().transpose(1, 2)
    kh = k.double().transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.double().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2) * sm_scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(allowed, torch.exp(scores - torch.where(allowed.any(-1, keepdim=True), lse[..., None], 0)), 0)
    return (probs @ vh).transpose(1, 2), lse


def outputs_and_grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o, lse = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), lse.detach(), dq, dk, dv


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("seed, batch, seq_len, num_kv_heads, group, head_dim, density, window, sink", [
    (0, 1, 130, 2, 3, 16, 0.4, None, 0),
    (1, 2, 200, 1, 2, 32, 0.6, [70], 4),
    (2, 1, 97, 3, 1, 8, 1.0, [0, 33, 200], 4),
    (3, 1, 192, 2, 2, 16, 0.3, [64, 1], 0),
])
def test_reference_matches_brute_force(seed, batch, seq_len, num_kv_heads, group, head_dim, density, window, sink):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = make_inputs(batch, seq_len, num_kv_heads, group, head_dim, gen)
    block_idx, block_cnt = random_selection(batch, num_kv_heads, seq_len, density, gen)
    kv_window = torch.tensor(window, dtype=torch.int32) if window is not None else None
    scale = 0.3
    want = outputs_and_grads(lambda q, k, v: brute_force_attention(q, k, v, block_idx, block_cnt, kv_window, sink,
                                                                    scale), q, k, v, do)
    for chunk_rows in (None, 64):                 # one chunk, and several (the checkpointed path)
        got = outputs_and_grads(lambda q, k, v: block_sparse_attention_reference(
            q, k, v, block_idx, block_cnt, kv_window=kv_window, sink_tokens=sink, sm_scale=scale,
            chunk_rows=chunk_rows), q, k, v, do)
        for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-5,
                                       msg=f"{name} chunk_rows={chunk_rows}")


def test_reference_without_lse_and_with_rows_that_see_nothing():
    """return_lse=False (the training attention's call) returns lse None and the same o and gradients;
    rows that see nothing (query block 0 selects no block) get o = 0 and zero gradients, as brute force."""
    gen = torch.Generator().manual_seed(8)
    q, k, v, do = make_inputs(1, 200, 2, 3, 16, gen)
    block_idx, block_cnt = random_selection(1, 2, 200, 0.5, gen, drop_own_block=True)
    kv_window = torch.tensor([70, 0], dtype=torch.int32)
    want = outputs_and_grads(lambda q, k, v: brute_force_attention(q, k, v, block_idx, block_cnt, kv_window, 4,
                                                                    0.25), q, k, v, do)
    with_lse = outputs_and_grads(lambda q, k, v: block_sparse_attention(
        q, k, v, block_idx, block_cnt, kv_window=kv_window, sink_tokens=4, sm_scale=0.25, backend="reference"),
        q, k, v, do)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), with_lse, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-5, msg=name)
    assert torch.all(with_lse[0][:, :64] == 0) and torch.all(with_lse[1][:, :, :64] == float("-inf"))

    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o, lse = block_sparse_attention(q, k, v, block_idx, block_cnt, kv_window=kv_window, sink_tokens=4,
                                    sm_scale=0.25, backend="reference", return_lse=False)
    assert lse is None
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o.detach(), *torch.autograd.grad(o, (q, k, v), do)),
                          with_lse[:1] + with_lse[2:]):
        assert torch.equal(a, b), name


def test_reference_all_blocks_equals_sdpa_causal():
    gen = torch.Generator().manual_seed(5)
    batch, seq_len, num_kv_heads, group, head_dim = 2, 150, 2, 3, 32
    q, k, v, do = make_inputs(batch, seq_len, num_kv_heads, group, head_dim, gen)
    num_blocks = math.ceil(seq_len / 64)
    all_causal = torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril().expand(batch, num_kv_heads, -1, -1)
    block_idx, block_cnt = block_index_from_mask(all_causal)

    def sdpa(q, k, v):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return o.transpose(1, 2), torch.zeros(())

    want = outputs_and_grads(sdpa, q, k, v, do)
    # No window, and a window that covers the whole sequence: both are full causal attention.
    for kv_window in (None, torch.full((num_kv_heads,), seq_len, dtype=torch.int32)):
        got = outputs_and_grads(lambda q, k, v: block_sparse_attention(
            q, k, v, block_idx, block_cnt, kv_window=kv_window, sink_tokens=4, backend="reference"), q, k, v, do)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_reference_saves_no_quadratic_activations():
    """Under autograd the reference keeps O(T * chunk) per step, not the T x T scores (checkpointing)."""
    gen = torch.Generator().manual_seed(6)
    batch, seq_len, num_kv_heads, group, head_dim = 1, 1024, 1, 2, 16
    q, k, v, _ = make_inputs(batch, seq_len, num_kv_heads, group, head_dim, gen)
    q.requires_grad_(True)
    block_idx, block_cnt = random_selection(batch, num_kv_heads, seq_len, 1.0, gen)
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    saved = {}

    def pack(t):      # new memory only: views of q, k, v cost nothing extra
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = block_sparse_attention_reference(q, k, v, block_idx, block_cnt, chunk_rows=128)
    scores_bytes = batch * num_kv_heads * group * seq_len * seq_len * 4
    assert sum(saved.values()) < scores_bytes / 16, (sum(saved.values()), scores_bytes)
    assert torch.isfinite(o).all()


def test_streaming_block_mask_covers_window_exactly():
    seq_len, window, sink, bs = 300, 70, 4, 64
    mask = streaming_block_mask(seq_len, window, sink, bs)
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    needed = (j <= i) & ((i - j < window) | (j < sink))
    num_blocks = mask.shape[0]
    want = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    for qi, kj in needed.nonzero().tolist():
        want[qi // bs, kj // bs] = True
    assert torch.equal(mask, want)


def test_block_index_from_mask_layout():
    mask = torch.tensor([[[True, False, False], [True, True, False], [False, True, True]]])
    block_idx, block_cnt = block_index_from_mask(mask, min_width=3)
    assert block_idx.dtype == torch.int32 and block_cnt.dtype == torch.int32
    assert block_idx.tolist() == [[[0, -1, -1], [0, 1, -1], [1, 2, -1]]]
    assert block_cnt.tolist() == [[1, 2, 2]]
    assert torch.equal(mask_from_block_index(block_idx[None], block_cnt[None], 3)[0], mask)


def test_bad_inputs_raise_clear_errors():
    gen = torch.Generator().manual_seed(7)
    q, k, v, _ = make_inputs(1, 70, 2, 2, 64, gen)
    block_idx, block_cnt = random_selection(1, 2, 70, 1.0, gen)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        block_sparse_attention(q[:, :, :3], k, v, block_idx, block_cnt)
    with pytest.raises(ValueError, match="block_idx must be int32"):
        block_sparse_attention(q, k, v, block_idx.long(), block_cnt)
    with pytest.raises(ValueError, match="kv_window"):
        block_sparse_attention(q, k, v, block_idx, block_cnt, kv_window=torch.tensor([5], dtype=torch.int32))
    unsorted = block_idx.clone()
    unsorted[0, 0, 1, :2] = torch.tensor([1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="ascending"):
        check_block_index_values(unsorted, block_cnt)
    future = block_idx.clone()
    future[0, 0, 0, 0] = 1
    with pytest.raises(ValueError, match="causal"):
        check_block_index_values(future, block_cnt)
    q96 = torch.randn(1, 70, 4, 96, generator=gen)
    k96 = torch.randn(1, 70, 2, 96, generator=gen)
    with pytest.raises(ValueError, match="head_dim 64 and 128"):
        block_sparse_attention(q96, k96, k96, block_idx, block_cnt, backend="triton")


# ----------------------------------------------------------------------------- triton (interpreter)


def test_reverse_map_matches_definition():
    from rtpurbo_kernels.block_sparse_attn.reverse_map import build_reverse_block_map
    gen = torch.Generator().manual_seed(8)
    batch, num_kv_heads, seq_len = 2, 3, 64 * 7 - 5
    block_idx, block_cnt = random_selection(batch, num_kv_heads, seq_len, 0.4, gen, drop_own_block=True)
    num_blocks = block_idx.shape[2]
    rev_ptr, rev_qblk = build_reverse_block_map(block_idx, block_cnt, num_blocks)
    assert rev_ptr.dtype == torch.int32 and rev_qblk.dtype == torch.int32
    for b, h, kb in itertools.product(range(batch), range(num_kv_heads), range(num_blocks)):
        row = (b * num_kv_heads + h) * num_blocks + kb
        want = [qb for qb in range(num_blocks) if kb in block_idx[b, h, qb, :block_cnt[b, h, qb]].tolist()]
        assert rev_qblk[rev_ptr[row]:rev_ptr[row + 1]].tolist() == want


TRITON_CASES = [
    # seed, B, T, Hkv, G, D, density, kv_window, sink
    (10, 1, 65, 1, 1, 64, 1.0, None, 0),
    (11, 2, 131, 1, 3, 64, 0.5, None, 0),
    (12, 1, 199, 2, 4, 128, 0.3, None, 0),
    (13, 1, 150, 1, 8, 64, 0.6, None, 0),
    (14, 1, 190, 2, 1, 128, 0.8, [70, 0], 4),        # window not a multiple of 64, mixed heads
    (15, 1, 200, 1, 4, 64, 1.0, [100], 4),
    (16, 1, 177, 2, 3, 64, 0.5, [500, 1], 0),        # window >= T; window 1 = the diagonal only
    (17, 1, 128, 1, 2, 128, 0.7, [64], 4),
    (18, 2, 100, 1, 1, 64, 0.25, [20], 70),          # sink reaches into the second block
]


def _check_triton_against_reference(q, k, v, do, block_idx, block_cnt, kv_window, sink, scale=None, atol=1e-4):
    def run(backend):
        return outputs_and_grads(lambda q, k, v: block_sparse_attention(
            q, k, v, block_idx, block_cnt, kv_window=kv_window, sink_tokens=sink, sm_scale=scale,
            backend=backend), q, k, v, do)

    got, want = run("triton"), run("reference")
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(a).any(), f"{name} holds NaN (an element the kernel did not write)"
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("seed, batch, seq_len, num_kv_heads, group, head_dim, density, window, sink", TRITON_CASES)
def test_triton_matches_reference(seed, batch, seq_len, num_kv_heads, group, head_dim, density, window, sink):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = make_inputs(batch, seq_len, num_kv_heads, group, head_dim, gen)
    block_idx, block_cnt = random_selection(batch, num_kv_heads, seq_len, density, gen)
    kv_window = torch.tensor(window, dtype=torch.int32) if window is not None else None
    _check_triton_against_reference(q, k, v, do, block_idx, block_cnt, kv_window, sink)


def test_triton_streaming_selection_and_strided_inputs():
    """Streaming-head blocks from streaming_block_mask, inputs that are transposed views of
    [B, H, T, D] tensors (the kernels use strides), and a custom sm_scale."""
    gen = torch.Generator().manual_seed(20)
    batch, seq_len, num_kv_heads, group, head_dim, window, sink = 1, 160, 2, 2, 64, 90, 4
    q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2)
                   for x in make_inputs(batch, seq_len, num_kv_heads, group, head_dim, gen))
    assert not q.is_contiguous()
    mask = streaming_block_mask(seq_len, window, sink).expand(batch, num_kv_heads, -1, -1)
    block_idx, block_cnt = block_index_from_mask(mask)
    kv_window = torch.full((num_kv_heads,), window, dtype=torch.int32)
    _check_triton_against_reference(q, k, v, do, block_idx, block_cnt, kv_window, sink, scale=0.2)


def test_triton_rows_without_keys():
    """Outside the contract (a query block that selects nothing): both backends give o = 0,
    lse = -inf and zero gradients there, and no NaN anywhere."""
    gen = torch.Generator().manual_seed(21)
    batch, seq_len, num_kv_heads, group, head_dim = 1, 140, 2, 2, 64
    q, k, v, do = make_inputs(batch, seq_len, num_kv_heads, group, head_dim, gen)
    block_idx, block_cnt = random_selection(batch, num_kv_heads, seq_len, 0.5, gen, drop_own_block=True)
    _check_triton_against_reference(q, k, v, do, block_idx, block_cnt, None, 0)
    o, lse = block_sparse_attention(q, k, v, block_idx, block_cnt, backend="triton")
    assert torch.all(o[:, :64] == 0) and torch.all(lse[:, :, :64] == float("-inf"))


def test_triton_half_precision_close_to_fp32_reference():
    gen = torch.Generator().manual_seed(22)
    batch, seq_len, num_kv_heads, group, head_dim = 1, 130, 1, 2, 64
    q, k, v, do = make_inputs(batch, seq_len, num_kv_heads, group, head_dim, gen)
    block_idx, block_cnt = random_selection(batch, num_kv_heads, seq_len, 0.7, gen)
    want = outputs_and_grads(lambda q, k, v: block_sparse_attention(q, k, v, block_idx, block_cnt,
                                                                    backend="reference"), q, k, v, do)
    half = [x.half() for x in (q, k, v, do)]
    got = outputs_and_grads(lambda q, k, v: block_sparse_attention(q, k, v, block_idx, block_cnt,
                                                                   backend="triton"), *half)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float32
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(a).any(), name
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 1e-2, (name, float(rel))


@pytest.mark.parametrize("config", [
    {"fwd_block_m": 128, "dq_block_m": 128, "dkdv_block_m": 128},    # G * bs = 192 rows: a half-empty tile
    {"fwd_block_m": 32, "dq_block_m": 16, "dkdv_block_m": 32},
])
def test_triton_other_tile_shapes(config):
    """The tile sizes a benchmark sweep may pick compute the same function."""
    from rtpurbo_kernels.block_sparse_attn.triton_bwd import block_sparse_attn_bwd
    from rtpurbo_kernels.block_sparse_attn.triton_fwd import block_sparse_attn_fwd
    gen = torch.Generator().manual_seed(23)
    batch, seq_len, num_kv_heads, group, head_dim, sink = 1, 150, 1, 3, 64, 4
    q, k, v, do = make_inputs(batch, seq_len, num_kv_heads, group, head_dim, gen)
    block_idx, block_cnt = random_selection(batch, num_kv_heads, seq_len, 0.6, gen)
    scale = head_dim ** -0.5
    want = outputs_and_grads(lambda q, k, v: block_sparse_attention_reference(
        q, k, v, block_idx, block_cnt, sink_tokens=sink), q, k, v, do)
    o, lse = block_sparse_attn_fwd(q, k, v, block_idx, block_cnt, None, sink, scale, 64, config)
    got = (o, lse) + block_sparse_attn_bwd(do, q, k, v, o, lse, block_idx, block_cnt, None, sink, scale, 64, config)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_reverse_map_queues_without_host_sync(forbid_host_sync):
    # The backward builds it for every layer; a device sync there stalls the training step.
    from rtpurbo_kernels.block_sparse_attn.reverse_map import build_reverse_block_map
    block_idx, block_cnt = random_selection(1, 2, 64 * 5, 0.5, torch.Generator().manual_seed(2), drop_own_block=True)
    with forbid_host_sync():
        build_reverse_block_map(block_idx, block_cnt, block_idx.shape[2])
    with pytest.raises(AssertionError, match="host synchronisation"):  # the guard itself works
        with forbid_host_sync():
            block_cnt.max().item()
