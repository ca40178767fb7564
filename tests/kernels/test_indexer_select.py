"""indexer_block_select: Triton (CPU interpreter) vs the PyTorch reference, and both vs a float64
brute force that enumerates block subsets."""
import itertools

import pytest
import torch


from rtpurbo_kernels.indexer_select import (
    block_index_from_mask,
    block_mass_reference,
    indexer_block_select,
    mask_from_block_index,
    select_blocks_from_mass,
)
from rtpurbo_kernels.indexer_select import naive as select_naive
from rtpurbo_kernels.indexer_select.block_mass_triton import block_mass_triton
from rtpurbo_kernels.indexer_select import select_triton
from rtpurbo_kernels.indexer_select.select_triton import select_blocks_triton
from selection_checks import assert_same_choice  # tests/kernels/ is on sys.path (pytest prepend mode)


def random_indexer(B, T, Hkv, G, d, dtype=torch.float32, seed=0, spread=2.0):
    """Fresh qi [B, T, G*Hkv, d], ki [B, T, Hkv, d]; `spread` sharpens the softmax (fewer near-ties)."""
    gen = torch.Generator().manual_seed(seed)
    qi = (spread * torch.randn(B, T, Hkv * G, d, generator=gen)).to(dtype)
    ki = torch.randn(B, T, Hkv, d, generator=gen).to(dtype)
    return qi, ki


def dense_mask(block_idx, block_cnt):
    """The INTERFACES.md snippet, literally: [B, H, NQB, NQB] bool."""
    B, H, nqb, _ = block_idx.shape
    mask = torch.zeros(B, H, nqb, nqb, dtype=torch.bool)
    for b, h, qb in itertools.product(range(B), range(H), range(nqb)):
        mask[b, h, qb, block_idx[b, h, qb, :block_cnt[b, h, qb]].long()] = True
    return mask


def check_layout(block_idx, block_cnt):
    assert block_idx.dtype == torch.int32 and block_cnt.dtype == torch.int32
    B, H, nqb, maxb = block_idx.shape
    assert maxb >= max(1, int(block_cnt.max()))  # an upper bound (a static width saves a device sync)
    for b, h, qb in itertools.product(range(B), range(H), range(nqb)):
        c = int(block_cnt[b, h, qb])
        row = block_idx[b, h, qb].tolist()
        assert row[c:] == [-1] * (maxb - c)
        assert row[:c] == sorted(set(row[:c])), "sorted ascending, unique"
        assert all(0 <= x <= qb for x in row[:c]), "nothing above the diagonal"
        assert qb in row[:c], "every query block selects its own block"


CASES = [  # B, T, Hkv, G, d, dtype
    (1, 200, 2, 1, 16, torch.float32),
    (2, 130, 1, 3, 16, torch.float32),
    (1, 257, 2, 4, 32, torch.bfloat16),
    (1, 150, 1, 8, 8, torch.float16),  # d = 8 is zero-padded to 16 inside the kernel
    (1, 64, 1, 4, 64, torch.float32),
]


@pytest.mark.parametrize("B,T,Hkv,G,d,dtype", CASES)
def test_triton_masses_match_reference_and_fill_every_causal_entry(B, T, Hkv, G, d, dtype):
    qi, ki = random_indexer(B, T, Hkv, G, d, dtype, seed=T + G)
    ref = block_mass_reference(qi, ki, block_size=64)
    nqb = ref.shape[-1]
    poisoned = torch.full_like(ref, float("nan"))
    got = block_mass_triton(qi, ki, block_size=64, out=poisoned)
    causal = torch.ones(nqb, nqb, dtype=torch.bool).tril()
    assert not torch.isnan(got[..., causal]).any()
    torch.testing.assert_close(got[..., causal], ref[..., causal], atol=2e-6, rtol=1e-5)
    # Each query block's masses sum to 1 (mean of row distributions).
    torch.testing.assert_close(ref.sum(-1), torch.ones_like(ref.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["top_p", "top_k", "all"])
@pytest.mark.parametrize("B,T,Hkv,G", [(1, 330, 2, 3), (2, 200, 1, 8)])
def test_triton_selection_matches_reference(mode, B, T, Hkv, G):
    qi, ki = random_indexer(B, T, Hkv, G, 16, seed=7 * T + G, spread=3.0)
    kw = {"top_p": {"top_p": 0.8}, "top_k": {"top_k": 2}, "all": {"top_p": 1.0}}[mode]
    kw.update(block_size=64, sink_blocks=1, local_blocks=1)
    ref = indexer_block_select(qi, ki, backend="reference", **kw)
    tri = indexer_block_select(qi, ki, backend="triton", **kw)
    check_layout(*ref)
    check_layout(*tri)
    mass = block_mass_reference(qi, ki, block_size=64)
    assert_same_choice(dense_mask(*tri), dense_mask(*ref), mass, torch.arange(mass.shape[-1]), top_p=kw["top_p"]
                       if "top_p" in kw else 1.0, sink=1, local=1, exact=mode != "top_p")
    if mode == "all":
        nqb = mass.shape[-1]
        assert torch.equal(ref[1], torch.arange(1, nqb + 1, dtype=torch.int32).expand(B, Hkv, nqb))


def sampled_rows_by_rule(T, block_size, query_stride, qb):
    """The rows a query block averages, written out from the README rule with a plain loop: every
    S-th row of the block (offsets S-1, 2S-1, ...) and the block's last row."""
    first, last = qb * block_size, min(T, (qb + 1) * block_size) - 1
    rows = [m for m in range(first, last + 1) if (m - first) % query_stride == query_stride - 1]
    return sorted(set(rows + [last]))


def brute_force_masses(qi, ki, block_size, query_stride=1):
    """float64, full T x T softmax per query head, explicit loops over blocks: [B, Hkv, NQB, NQB]."""
    B, T, Hq, d = qi.shape
    Hkv = ki.shape[2]
    G = Hq // Hkv
    q = qi.double().permute(0, 2, 1, 3)
    k = ki.double().permute(0, 2, 1, 3).repeat_interleave(G, dim=1)
    s = torch.einsum("bhmd,bhnd->bhmn", q, k) / d ** 0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    nqb = -(-T // block_size)
    mass = torch.zeros(B, Hkv, nqb, nqb, dtype=torch.float64)
    for qb, kb in itertools.product(range(nqb), range(nqb)):
        rows = sampled_rows_by_rule(T, block_size, query_stride, qb)
        cols = slice(kb * block_size, min(T, (kb + 1) * block_size))
        per_head = p[:, :, rows, cols].sum(-1).mean(-1)  # [B, Hq]
        mass[:, :, qb, kb] = per_head.view(B, Hkv, G).mean(-1)
    return mass


def brute_force_expected(mass_row, qb, top_p, top_k, sink_blocks, local_blocks):
    """Expected set for one query block by enumerating every subset of the candidate blocks (causal, not
    sink or local), or None when a subset's share of the candidates' mass is within 1e-5 of top_p (fp32
    kernels may then decide either way)."""
    forced = {kb for kb in range(qb + 1) if kb < sink_blocks or kb > qb - local_blocks}
    if top_k is None and top_p >= 1.0:
        return list(range(qb + 1))
    candidates = [kb for kb in range(qb + 1) if kb not in forced]
    w = {kb: float(mass_row[kb]) for kb in candidates}
    total = sum(w.values())
    heaviest = sorted(candidates, key=lambda kb: -w[kb])
    if top_k is not None:
        chosen = set(heaviest[:top_k])
    else:
        need = 0
        for size in range(1, len(candidates) + 1):
            shares = [sum(w[kb] for kb in sub) / total for sub in itertools.combinations(candidates, size)]
            if any(abs(x - top_p) < 1e-5 for x in shares):
                return None
            if max(shares) >= top_p:
                need = size
                break
        chosen = set(heaviest[:need])
    return sorted(chosen | forced)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("top_p,top_k,sink,local", [(0.5, None, 1, 1), (0.9, None, 2, 2), (0.3, None, 0, 1),
                                                     (0.9, 3, 1, 1), (1.0, None, 0, 0), (0.9, None, 1, 3),
                                                     (0.6, 2, 1, 3)])
def test_selection_matches_brute_force_subset_enumeration(backend, top_p, top_k, sink, local):
    # bs = 16 keeps the shapes tiny: 6 query blocks, at most 2^6 subsets per row.
    B, T, Hkv, G, bs = 2, 90, 2, 3, 16
    qi, ki = random_indexer(B, T, Hkv, G, 16, seed=int(100 * top_p) + sink + local, spread=3.0)
    block_idx, block_cnt = indexer_block_select(qi, ki, top_p=top_p, top_k=top_k, block_size=bs, sink_blocks=sink,
                                                local_blocks=local, backend=backend)
    check_layout(block_idx, block_cnt)
    mass = brute_force_masses(qi, ki, bs)
    checked = 0
    for b, h, qb in itertools.product(range(B), range(Hkv), range(mass.shape[-1])):
        expected = brute_force_expected(mass[b, h, qb], qb, top_p, top_k, sink, local)
        if expected is None:
            continue
        got = block_idx[b, h, qb, :block_cnt[b, h, qb]].tolist()
        assert got == expected, (b, h, qb, got, expected)
        checked += 1
    assert checked >= 20  # near-ties are rare: almost every row is checked


STRIDED_CASES = [  # B, T, Hkv, G, d, dtype, S
    (1, 200, 2, 1, 16, torch.float32, 8),
    (2, 131, 1, 3, 16, torch.float32, 4),
    (1, 257, 2, 4, 16, torch.bfloat16, 8),
    (1, 150, 1, 8, 8, torch.float16, 16),
    (1, 190, 1, 6, 32, torch.float32, 64),  # one row per full block: its last
]


@pytest.mark.parametrize("B,T,Hkv,G,d,dtype,S", STRIDED_CASES)
def test_strided_masses_match_brute_force_on_both_backends(B, T, Hkv, G, d, dtype, S):
    qi, ki = random_indexer(B, T, Hkv, G, d, dtype, seed=T + 10 * S)
    expected = brute_force_masses(qi.float(), ki.float(), 64, query_stride=S).float()
    nqb = expected.shape[-1]
    causal = torch.ones(nqb, nqb, dtype=torch.bool).tril()
    ref = block_mass_reference(qi, ki, block_size=64, query_stride=S)
    poisoned = torch.full_like(ref, float("nan"))
    tri = block_mass_triton(qi, ki, block_size=64, out=poisoned, query_stride=S)
    assert not torch.isnan(tri[..., causal]).any()
    torch.testing.assert_close(ref[..., causal], expected[..., causal], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(tri[..., causal], expected[..., causal], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ref.sum(-1), torch.ones_like(ref.sum(-1)), atol=1e-5, rtol=0)


def test_strided_masses_differ_from_exact_and_stride_one_is_exact():
    qi, ki = random_indexer(1, 200, 1, 3, 16, seed=4, spread=3.0)
    exact = brute_force_masses(qi, ki, 64).float()
    torch.testing.assert_close(block_mass_reference(qi, ki, block_size=64, query_stride=1), exact, atol=2e-6, rtol=1e-5)
    strided = block_mass_reference(qi, ki, block_size=64, query_stride=8)
    assert (strided - exact).abs().max() > 1e-3  # the sample is a real approximation, not the same rows


@pytest.mark.parametrize("B,T,Hkv,G,S", [(1, 330, 2, 3, 8), (2, 200, 1, 4, 4)])
def test_strided_selection_agrees_across_backends_and_with_brute_force(B, T, Hkv, G, S):
    qi, ki = random_indexer(B, T, Hkv, G, 16, seed=3 * T + S, spread=3.0)
    kw = dict(top_p=0.8, block_size=64, sink_blocks=1, local_blocks=1, query_stride=S)
    ref = indexer_block_select(qi, ki, backend="reference", **kw)
    tri = indexer_block_select(qi, ki, backend="triton", **kw)
    check_layout(*ref)
    check_layout(*tri)
    mass = brute_force_masses(qi, ki, 64, query_stride=S)
    assert_same_choice(dense_mask(*tri), dense_mask(*ref), mass.float(), torch.arange(mass.shape[-1]), top_p=0.8,
                       sink=1, local=1, exact=False)
    for b, h, qb in itertools.product(range(B), range(Hkv), range(mass.shape[-1])):
        expected = brute_force_expected(mass[b, h, qb], qb, 0.8, None, 1, 1)
        if expected is not None:
            assert ref[0][b, h, qb, :ref[1][b, h, qb]].tolist() == expected


def test_strided_reference_chunking_does_not_change_masses(monkeypatch):
    qi, ki = random_indexer(1, 300, 2, 3, 16, seed=12)
    whole = block_mass_reference(qi, ki, block_size=64, query_stride=8)
    monkeypatch.setattr(select_naive, "CHUNK_BYTES", 1)
    chunked = block_mass_reference(qi, ki, block_size=64, query_stride=8)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_reference_chunking_does_not_change_masses(monkeypatch):
    qi, ki = random_indexer(1, 300, 2, 3, 16, seed=11)
    whole = block_mass_reference(qi, ki, block_size=64)
    monkeypatch.setattr(select_naive, "CHUNK_BYTES", 1)  # one query block per chunk
    chunked = block_mass_reference(qi, ki, block_size=64)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)  # matmul shapes differ: fp32 rounding


def test_forced_blocks_with_tiny_top_p():
    qi, ki = random_indexer(1, 64 * 6, 1, 2, 16, seed=3)
    block_idx, block_cnt = indexer_block_select(qi, ki, top_p=1e-9, sink_blocks=2, local_blocks=2,
                                                backend="reference")
    mask = mask_from_block_index(block_idx, block_cnt, 6)[0, 0]
    for qb in range(6):
        forced = {x for x in (0, 1, qb - 1, qb) if 0 <= x <= qb}
        got = set(mask[qb].nonzero().flatten().tolist())
        assert forced <= got and len(got - forced) <= 1  # one heaviest block at most on top


def test_bad_inputs_raise_clear_errors():
    qi, ki = random_indexer(1, 64, 2, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        indexer_block_select(qi[:, :, :3], ki)
    with pytest.raises(ValueError, match="B, T or d"):
        indexer_block_select(qi, ki[:, :32])
    with pytest.raises(ValueError, match="top_p"):
        indexer_block_select(qi, ki, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        indexer_block_select(qi, ki, top_k=0)
    with pytest.raises(ValueError, match="block_size"):
        indexer_block_select(qi, ki, block_size=48)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        indexer_block_select(qi, ki, backend="cuda")
    for bad in (0, 3, 128, 2.5, True):
        with pytest.raises(ValueError, match="query_stride"):
            indexer_block_select(qi, ki, query_stride=bad)


@pytest.mark.parametrize("top_p,top_k", [(0.9, None), (0.9, 4)])
def test_selection_from_masses_queues_without_host_sync(top_p, top_k, forbid_host_sync):
    from rtpurbo_kernels.indexer_select import select_blocks_from_mass
    qi, ki = random_indexer(1, 64 * 9 - 7, 2, 2, 16, seed=5)
    mass = block_mass_reference(qi, ki, block_size=64)
    with forbid_host_sync():
        idx, cnt = select_blocks_from_mass(mass, top_p=top_p, top_k=top_k, sink_blocks=1, local_blocks=2)
    check_layout(idx, cnt)
    exact_idx, exact_cnt = block_index_from_mask(mask_from_block_index(idx, cnt, 9))  # width = widest row
    assert torch.equal(cnt, exact_cnt) and torch.equal(idx[..., :exact_idx.shape[-1]], exact_idx)
    assert (idx[..., exact_idx.shape[-1]:] == -1).all()


ROW_RULES = [  # top_p, top_k, sink_blocks, local_blocks
    (0.9, None, 1, 2), (0.5, None, 0, 1), (0.8, None, 1, 9), (0.9, 3, 1, 2), (0.7, 1, 2, 5), (1.0, None, 1, 2),
]


@pytest.mark.parametrize("top_p,top_k,sink,local", ROW_RULES)
@pytest.mark.parametrize("B,H,nqb", [(1, 1, 1), (2, 1, 21), (1, 1, 33)])
def test_fused_row_selection_matches_the_torch_selection(monkeypatch, top_p, top_k, sink, local, B, H, nqb):
    # The Triton rows (interpreter) against select_blocks_from_mass on random row-normalised masses: same
    # indices and counts (the layout: ascending, -1 padded, the same sync-free width), outputs poisoned first.
    monkeypatch.setattr(select_triton, "POISON_OUTPUTS", True)
    gen = torch.Generator().manual_seed(nqb * 7 + local)
    mass = torch.rand(B, H, nqb, nqb, generator=gen) ** 4  # peaked rows
    mass = torch.where(torch.rand(mass.shape, generator=gen) < 0.1, 0.0, mass)  # exact zeros tie
    mass[..., 0, 0] = 0.0
    mass = mass.tril() / mass.tril().sum(-1, keepdim=True).clamp_min(1e-30)
    mass = mass + torch.triu(torch.full_like(mass, float("nan")), diagonal=1)  # kb > qb is never read
    rule = dict(top_p=top_p, top_k=top_k, sink_blocks=sink, local_blocks=local)
    ref_idx, ref_cnt = select_blocks_from_mass(mass, **rule)
    idx, cnt = select_blocks_triton(mass, width=ref_idx.shape[-1], **rule)
    assert idx.shape == ref_idx.shape and cnt.dtype == torch.int32 and idx.dtype == torch.int32
    check_layout(idx, cnt)
    assert_same_choice(dense_mask(idx, cnt), dense_mask(ref_idx, ref_cnt), mass, torch.arange(nqb), top_p=top_p,
                       sink=sink, local=local, exact=top_k is not None or top_p >= 1.0)


def test_fused_row_selection_breaks_ties_by_lower_block_index():
    mass = torch.zeros(1, 1, 8, 8)
    mass[0, 0, 7] = torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0])
    for rule in (dict(top_k=2), dict(top_p=0.4)):
        idx, cnt = select_blocks_triton(mass, width=8, sink_blocks=0, local_blocks=1, **rule)
        assert idx[0, 0, 7, :cnt[0, 0, 7]].tolist() == [1, 2, 7], rule
