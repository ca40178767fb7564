"""indexer_kl_loss: Triton (CPU interpreter) vs the PyTorch reference, both vs a dense float64
computation, with NaN-poisoned kernel buffers and gradients checked to reach only qi and ki; also the
query-block subsampling (`query_block_stride`)."""
import itertools

import pytest
import torch


from rtpurbo_kernels.indexer_kl import indexer_kl_loss, indexer_kl_loss_reference
from rtpurbo_kernels.indexer_kl import kl_triton
from rtpurbo_kernels.indexer_kl.transpose_selection import query_blocks_per_key_block
from rtpurbo_kernels.indexer_select import indexer_block_select
from rtpurbo_kernels.indexer_select import naive as select_naive


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every kernel output/scratch buffer starts NaN: an element a kernel forgets shows up as NaN."""
    monkeypatch.setattr(kl_triton, "empty_buffer",
                        lambda *shape, device: torch.full(shape, float("nan"), device=device))


def random_inputs(B, T, Hkv, G, D, d, dtype=torch.float32, seed=0):
    """Fresh q, k (requires_grad, to prove no gradient reaches them), qi, ki (leaves)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hkv * G, D, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(B, T, Hkv, D, generator=gen).to(dtype).requires_grad_()
    qi = (1.5 * torch.randn(B, T, Hkv * G, d, generator=gen)).to(dtype).requires_grad_()
    ki = torch.randn(B, T, Hkv, d, generator=gen).to(dtype).requires_grad_()
    return q, k, qi, ki


def loss_and_grads(q, k, qi, ki, **kw):
    for x in (q, k, qi, ki):
        x.grad = None
    loss = indexer_kl_loss(q, k, qi, ki, **kw)
    loss.backward()
    assert q.grad is None and k.grad is None, "q and k are constants"
    return loss.detach(), qi.grad.float(), ki.grad.float()


def selection(qi, ki, bs=64, top_p=0.6):
    # local_blocks=1 (the query's own block only): top-p chooses among every earlier block but the sink, so
    # even a 4-block sequence drops some
    return indexer_block_select(qi.detach(), ki.detach(), top_p=top_p, block_size=bs, local_blocks=1,
                                backend="reference")


def sampled_rows_mask(T, bs, stride):
    """bool [T]: the rows the subsampled loss averages over, from the rule with plain loops: query
    blocks NQB-1, NQB-1-S, NQB-1-2S, ... >= 0 (NQB = ceil(T / bs)), all their rows m < T."""
    nqb = -(-T // bs)
    blocks = []
    qb = nqb - 1
    while qb >= 0:
        blocks.append(qb)
        qb -= stride
    mask = torch.zeros(T, dtype=torch.bool)
    for m in range(T):
        mask[m] = (m // bs) in blocks
    return mask


def dense_float64_kl(q, k, qi, ki, sm_scale, block_idx=None, block_cnt=None, bs=64, rows=None):
    """Independent dense computation: full T x T in float64, the visibility mask built with explicit
    loops from the INTERFACES.md rule, KL via log_softmax and torch.special.xlogy. `rows` (bool [T],
    default all): the mean runs over these query rows only (count B * Hq * rows.sum())."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    d = qi.shape[-1]
    qi64 = qi.detach().double().requires_grad_()
    ki64 = ki.detach().double().requires_grad_()
    visible = torch.zeros(B, Hkv, T, T, dtype=torch.bool)
    if block_idx is not None:  # selected key blocks of each (b, h, query block), read once
        chosen = {(b, h, qb): set(block_idx[b, h, qb, :block_cnt[b, h, qb]].tolist())
                  for b, h, qb in itertools.product(range(B), range(Hkv), range(block_idx.shape[2]))}
    for i, j in itertools.product(range(T), range(T)):
        if j <= i:
            if block_idx is None:
                visible[:, :, i, j] = True
            else:
                for b, h in itertools.product(range(B), range(Hkv)):
                    visible[b, h, i, j] = (j // bs) in chosen[b, h, i // bs]
    visible = visible.repeat_interleave(G, dim=1)  # [B, Hq, T, T]
    s_full = sm_scale * torch.einsum("bmhd,bnhd->bhmn", q.detach().double(),
                                     k.detach().double().repeat_interleave(G, dim=2))
    s_idx = d ** -0.5 * torch.einsum("bmhd,bnhd->bhmn", qi64, ki64.repeat_interleave(G, dim=2))
    logp_full = torch.log_softmax(s_full.masked_fill(~visible, float("-inf")), -1)
    logp_idx = torch.log_softmax(s_idx.masked_fill(~visible, float("-inf")), -1)
    p_full = logp_full.exp()
    kl = torch.special.xlogy(p_full, p_full) - torch.where(visible, p_full * logp_idx, 0.0)
    if rows is None:
        rows = torch.ones(T, dtype=torch.bool)
    loss = kl[:, :, rows].sum() / (B * Hq * int(rows.sum()))
    loss.backward()
    return loss.detach(), qi64.grad, ki64.grad


CASES = [  # B, T, Hkv, G, D, d
    (1, 150, 2, 1, 32, 16),
    (2, 100, 1, 3, 16, 16),
    (1, 200, 2, 4, 64, 32),
    (1, 130, 1, 8, 32, 16),
]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("B,T,Hkv,G,D,d", CASES)
def test_triton_matches_reference_loss_and_grads(poisoned_buffers, sparse, B, T, Hkv, G, D, d):
    q, k, qi, ki = random_inputs(B, T, Hkv, G, D, d, seed=T * G + sparse)
    kw = dict(sm_scale=D ** -0.5)
    if sparse:
        kw["block_idx"], kw["block_cnt"] = selection(qi, ki)
    ref = loss_and_grads(q, k, qi, ki, backend="reference", **kw)
    tri = loss_and_grads(q, k, qi, ki, backend="triton", **kw)
    for r, t in zip(ref, tri):
        assert torch.isfinite(t).all()
        torch.testing.assert_close(t, r, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_inputs(poisoned_buffers, dtype):
    q, k, qi, ki = random_inputs(1, 140, 2, 3, 32, 16, dtype=dtype, seed=5)
    ref = loss_and_grads(q, k, qi, ki, sm_scale=32 ** -0.5, backend="reference")
    tri = loss_and_grads(q, k, qi, ki, sm_scale=32 ** -0.5, backend="triton")
    torch.testing.assert_close(tri[0], ref[0], atol=1e-5, rtol=1e-5)
    for r, t in zip(ref[1:], tri[1:]):  # gradients come back in the input dtype
        torch.testing.assert_close(t, r, atol=1e-2 * r.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("sparse", [False, True])
def test_matches_dense_float64_kl(backend, sparse):
    B, T, Hkv, G, D, d, bs = 1, 80, 2, 2, 16, 16, 16
    q, k, qi, ki = random_inputs(B, T, Hkv, G, D, d, seed=21 + sparse)
    kw = dict(sm_scale=0.3, block_size=bs)
    if sparse:
        kw["block_idx"], kw["block_cnt"] = selection(qi, ki, bs=bs, top_p=0.5)
        assert (kw["block_cnt"] < torch.arange(1, 6)).any(), "the selection must actually drop blocks"
    want = dense_float64_kl(q, k, qi, ki, 0.3, kw.get("block_idx"), kw.get("block_cnt"), bs)
    got = loss_and_grads(q, k, qi, ki, backend=backend, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_identical_distributions_give_zero_loss_and_gradient(backend):
    # q = qi, k = ki and sm_scale = scale: p_full == p_idx, so KL = 0 and its gradient is 0.
    _, _, qi, ki = random_inputs(1, 100, 1, 2, 16, 16, seed=4)
    q, k = qi.detach().clone().requires_grad_(), ki.detach().clone().requires_grad_()
    loss, dqi, dki = loss_and_grads(q, k, qi, ki, sm_scale=0.25, backend=backend)
    assert abs(loss.item()) < 1e-6
    assert dqi.abs().max() < 1e-6 and dki.abs().max() < 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_selection_of_every_block_equals_dense(backend):
    q, k, qi, ki = random_inputs(1, 190, 2, 2, 32, 16, seed=8)
    block_idx, block_cnt = selection(qi, ki, top_p=1.0)
    dense = loss_and_grads(q, k, qi, ki, sm_scale=0.2, backend=backend)
    sparse = loss_and_grads(q, k, qi, ki, sm_scale=0.2, block_idx=block_idx, block_cnt=block_cnt, backend=backend)
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 3])
def test_reference_chunking_does_not_change_loss_or_grads(monkeypatch, stride):
    q, k, qi, ki = random_inputs(1, 260, 1, 3, 16, 16, seed=9)
    kw = dict(sm_scale=0.25, backend="reference", block_size=32, query_block_stride=stride)
    whole = loss_and_grads(q, k, qi, ki, **kw)
    monkeypatch.setattr(select_naive, "CHUNK_BYTES", 1)  # one query block per chunk (checkpointed)
    chunked = loss_and_grads(q, k, qi, ki, **kw)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_no_grad_forward_matches(poisoned_buffers, stride):
    q, k, qi, ki = random_inputs(1, 100, 1, 4, 16, 16, seed=12)
    kw = dict(sm_scale=0.25, block_size=16, query_block_stride=stride)
    with torch.no_grad():
        ref = indexer_kl_loss(q, k, qi, ki, backend="reference", **kw)
        tri = indexer_kl_loss(q, k, qi, ki, backend="triton", **kw)
    torch.testing.assert_close(tri, ref, atol=1e-6, rtol=1e-5)
    assert ref.dtype == torch.float32 and ref.dim() == 0


def test_bad_inputs_raise_clear_errors():
    q, k, qi, ki = random_inputs(1, 64, 2, 2, 32, 16)
    with pytest.raises(ValueError, match="do not match"):
        indexer_kl_loss(q[:, :, :2], k, qi, ki, sm_scale=0.1)
    with pytest.raises(ValueError, match="dtypes"):
        indexer_kl_loss(q.half(), k, qi, ki, sm_scale=0.1)
    with pytest.raises(ValueError, match="go together"):
        indexer_kl_loss(q, k, qi, ki, sm_scale=0.1, block_idx=torch.zeros(1, 2, 1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_idx must be"):
        indexer_kl_loss(q, k, qi, ki, sm_scale=0.1, block_idx=torch.zeros(1, 1, 1, 1, dtype=torch.int32),
                        block_cnt=torch.ones(1, 2, 1, dtype=torch.int32))


STRIDE_CASES = [  # S, B, T, Hkv, G, D, d, block size, sparse
    (2, 1, 129, 2, 1, 64, 16, 32, False),  # NQB 5: blocks 4 (one row), 2, 0
    (3, 2, 200, 1, 3, 128, 16, 32, True),  # NQB 7: 6, 3, 0
    (5, 1, 333, 1, 4, 64, 16, 32, False),  # NQB 11: 10, 5, 0
    (3, 1, 333, 1, 8, 32, 16, 32, True),  # NQB 11: 10, 7, 4, 1 (block 0 unsampled)
    (2, 1, 200, 2, 4, 128, 16, 64, True),  # NQB 4: 3, 1
    (5, 1, 129, 1, 3, 16, 16, 64, False),  # S > NQB = 3: only block 2
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("S,B,T,Hkv,G,D,d,bs,sparse", STRIDE_CASES)
def test_query_block_stride_matches_dense_float64_on_sampled_rows(poisoned_buffers, backend, S, B, T, Hkv, G, D,
                                                                  d, bs, sparse):
    q, k, qi, ki = random_inputs(B, T, Hkv, G, D, d, seed=100 * S + T + G)
    kw = dict(sm_scale=D ** -0.5, block_size=bs)
    if sparse:
        kw["block_idx"], kw["block_cnt"] = selection(qi, ki, bs=bs, top_p=0.5)
        nqb = -(-T // bs)
        assert (kw["block_cnt"] < torch.arange(1, nqb + 1)).any(), "the selection must actually drop blocks"
    rows = sampled_rows_mask(T, bs, S)
    want = dense_float64_kl(q, k, qi, ki, D ** -0.5, kw.get("block_idx"), kw.get("block_cnt"), bs, rows=rows)
    got = loss_and_grads(q, k, qi, ki, backend=backend, query_block_stride=S, **kw)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, atol=1e-6, rtol=1e-4)
    dqi = got[1]
    assert (dqi[:, ~rows] == 0).all(), "rows outside the sampled blocks must get exactly zero gradient"
    assert (dqi[:, rows] != 0).any() and (got[2] != 0).any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("sparse", [False, True])
def test_query_block_stride_one_is_the_default(poisoned_buffers, backend, sparse):
    q, k, qi, ki = random_inputs(1, 150, 2, 2, 32, 16, seed=31 + sparse)
    kw = dict(sm_scale=0.2)
    if sparse:
        kw["block_idx"], kw["block_cnt"] = selection(qi, ki)
    default = loss_and_grads(q, k, qi, ki, backend=backend, **kw)
    explicit = loss_and_grads(q, k, qi, ki, backend=backend, query_block_stride=1, **kw)
    for a, b in zip(default, explicit):
        assert torch.equal(a, b)


def test_sampled_selection_keeps_only_sampled_query_blocks(forbid_host_sync):
    _, _, qi, ki = random_inputs(2, 300, 2, 1, 16, 16, seed=3)
    block_idx, block_cnt = selection(qi, ki, bs=32, top_p=0.7)  # NQB 10
    S = 4  # sampled: 9, 5, 1
    with forbid_host_sync():
        cnt = kl_triton.sampled_selection_counts(block_cnt, S)
        qidx, qcnt = query_blocks_per_key_block(block_idx, cnt, 10)
    for qb in range(10):
        want = block_cnt[:, :, qb] if qb in (9, 5, 1) else torch.zeros_like(block_cnt[:, :, qb])
        assert torch.equal(cnt[:, :, qb], want)
    listed = {v for v in qidx.flatten().tolist() if v >= 0}
    assert listed <= {9, 5, 1} and listed, listed
    assert (qcnt <= 3).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_strided_reference_queues_without_host_sync(forbid_host_sync, sparse):
    q, k, qi, ki = random_inputs(1, 200, 1, 2, 16, 16, seed=6)
    kw = dict(sm_scale=0.2, block_size=32, query_block_stride=3, backend="reference")
    if sparse:
        kw["block_idx"], kw["block_cnt"] = selection(qi, ki, bs=32)
    with forbid_host_sync():
        indexer_kl_loss(q, k, qi, ki, **kw).backward()
    assert torch.isfinite(qi.grad).all() and torch.isfinite(ki.grad).all()


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_query_block_stride_raises(bad):
    q, k, qi, ki = random_inputs(1, 64, 1, 2, 16, 16)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match="query_block_stride"):
            indexer_kl_loss(q, k, qi, ki, sm_scale=0.1, backend=backend, query_block_stride=bad)
    with pytest.raises(ValueError, match="query_block_stride"):
        indexer_kl_loss_reference(q, k, qi, ki, sm_scale=0.1, query_block_stride=bad)
