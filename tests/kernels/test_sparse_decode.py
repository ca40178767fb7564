"""One sparse decode step: Triton (CPU interpreter, backend="triton") vs the PyTorch references, and the
reference decode selection vs the whole-sequence indexer oracle (`block_mass_reference`)."""
import pytest
import torch

from rtpurbo_kernels.indexer_select import block_mass_reference, mask_from_block_index, select_blocks_from_mass
from rtpurbo_kernels.sparse_decode import (decode_attention, decode_attention_reference, decode_block_mass_reference,
                                           decode_block_select, decode_block_select_reference)
from rtpurbo_kernels.sparse_decode import attention_triton, select_triton

from selection_checks import assert_same_choice  # tests/kernels/ is on sys.path (pytest prepend mode)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN (True for `chosen`): an unwritten element fails."""
    monkeypatch.setattr(select_triton, "POISON_OUTPUTS", True)
    monkeypatch.setattr(attention_triton, "POISON_OUTPUTS", True)


def special_positions(C, bs, gen):
    """Positions whose masking is easy to get wrong, plus random ones."""
    return [0, 1, bs - 1, bs, bs + 1, 2 * bs - 1, C - 1, int(torch.randint(0, C, (1,), generator=gen))]


def position_sets(B, C, bs, seed):
    """Rows of `pos` ([B], different per row) that together cover every special position."""
    gen = torch.Generator().manual_seed(seed)
    special = special_positions(C, bs, gen)
    sets = []
    for start in range(0, len(special), B):
        row = [special[(start + i) % len(special)] for i in range(B)]
        sets.append(torch.tensor(row, dtype=torch.int64))
    return sets


def select_inputs(B, H, G, d, C, bs, pos, seed, S=1, spread=2.0):
    """qi [B, H, G, d], ikeys [B, H, C, d] with NaN past pos[b] (never scored), carry >= 0 everywhere
    (decoder_like_carry)."""
    gen = torch.Generator().manual_seed(seed)
    qi = spread * torch.randn(B, H, G, d, generator=gen)
    ikeys = torch.randn(B, H, C, d, generator=gen)
    slots = torch.arange(C)
    ikeys[(slots[None, :] > pos[:, None])[:, None, :, None].expand(B, H, C, d)] = float("nan")
    return qi, ikeys, decoder_like_carry(B, H, G, C, bs, S, pos, gen)


def decoder_like_carry(B, H, G, C, bs, S, pos, gen):
    """carry [B, H, NKB]: over kb <= qb, a peaked distribution of total mass G * (earlier sampled rows of the
    block), as a decoder accumulates it; elsewhere (and on rows at a block start) garbage that must be ignored."""
    nkb = C // bs
    carry = torch.rand(B, H, nkb, generator=gen) * G
    peaked = torch.rand(B, H, nkb, generator=gen) ** 6
    causal = (torch.arange(nkb)[None, :] <= (pos // bs)[:, None])[:, None, :]
    peaked = torch.where(causal, peaked, 0.0)
    earlier = ((pos % bs) // S * G).float().view(B, 1, 1)
    open_block = (pos % bs != 0).view(B, 1, 1)
    return torch.where(causal & open_block, peaked / peaked.sum(-1, keepdim=True) * earlier, carry)


SELECT_CASES = [  # B, H, G, d, C, block_size, query_stride
    (3, 2, 1, 16, 256, 16, 1),
    (2, 1, 3, 32, 512, 64, 8),
    (3, 2, 4, 16, 512, 64, 8),
    (2, 1, 8, 64, 256, 16, 1),
    (3, 1, 8, 16, 512, 16, 8),
]
SELECTIONS = [  # top_p, top_k, sink_blocks, local_blocks
    (0.5, None, 1, 2),
    (0.9, None, 0, 1),
    (1.0, None, 1, 2),
    (0.9, 3, 2, 0),
    (0.5, None, 1, 3),  # a retrieval window of 3 blocks: top-p over the blocks outside it
]


@pytest.mark.parametrize("B,H,G,d,C,bs,S", SELECT_CASES)
@pytest.mark.parametrize("top_p,top_k,sink,local", SELECTIONS)
def test_triton_select_matches_reference(B, H, G, d, C, bs, S, top_p, top_k, sink, local):
    kwargs = dict(block_size=bs, top_p=top_p, top_k=top_k, sink_blocks=sink, local_blocks=local, query_stride=S)
    some_dropped = False
    for i, pos in enumerate(position_sets(B, C, bs, seed=C + G)):
        qi, ikeys, carry = select_inputs(B, H, G, d, C, bs, pos, seed=100 * i + G, S=S)
        ref_chosen, ref_carry = decode_block_select_reference(qi, ikeys, pos, carry, **kwargs)
        mass, _ = decode_block_mass_reference(qi, ikeys, pos, carry, block_size=bs, query_stride=S)
        got_chosen, got_carry = decode_block_select(qi, ikeys, pos, carry, backend="triton", **kwargs)
        assert got_chosen.dtype == torch.bool and got_carry.dtype == torch.float32
        torch.testing.assert_close(got_carry, ref_carry, atol=1e-6, rtol=1e-5)
        assert_same_choice(got_chosen, ref_chosen, mass, (pos // bs).view(B, 1), top_p=top_p, sink=sink, local=local,
                           exact=top_k is not None or top_p >= 1.0)
        causal = torch.arange(C // bs)[None, None, :] <= (pos // bs)[:, None, None]
        assert not (got_chosen & ~causal).any()
        some_dropped |= bool((causal & ~ref_chosen).any())
    assert some_dropped == (top_p < 1.0 or top_k is not None), "the case must exercise the selection"


def test_triton_select_key_splits_and_strided_layouts():
    """Uneven stats-kernel splits and non-contiguous (batch/head-strided) inputs give the same result."""
    B, H, G, d, C, bs = 2, 3, 4, 16, 256, 16
    pos = torch.tensor([130, 47])
    qi, ikeys, carry = select_inputs(B, H, G, d, C, bs, pos, seed=7, S=8)
    ref = decode_block_select_reference(qi, ikeys, pos, carry, block_size=bs, top_k=4, query_stride=8)
    wide = torch.full((B, 2 * H, C, d), float("nan"))
    wide[:, ::2] = ikeys
    for splits in (1, 3, 5, 100):
        got = select_triton.decode_block_select_triton(qi, wide[:, ::2], pos, carry, block_size=bs, top_k=4,
                                                       query_stride=8, key_splits=splits)
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-5)


def test_triton_select_breaks_ties_by_lower_block_index():
    """Identical keys give identical masses: the stable-sort rule keeps the lowest-index blocks."""
    B, H, G, d, C, bs = 1, 1, 2, 16, 256, 16
    gen = torch.Generator().manual_seed(3)
    ikeys = torch.randn(1, 1, bs, d, generator=gen).repeat(1, 1, C // bs, 1)
    qi = torch.randn(B, H, G, d, generator=gen)
    carry = torch.zeros(B, H, C // bs)
    for pos, top_k, top_p in ((torch.tensor([255]), 5, 0.9), (torch.tensor([200]), None, 0.3)):
        kwargs = dict(block_size=bs, top_k=top_k, top_p=top_p, sink_blocks=0, local_blocks=0)
        ref = decode_block_select_reference(qi, ikeys, pos, carry, **kwargs)[0]
        got = decode_block_select(qi, ikeys, pos, carry, backend="triton", **kwargs)[0]
        assert torch.equal(got, ref)
        assert not ref[0, 0, -3:].any() and ref[0, 0, 0], "ties must favour low block indices"


@pytest.mark.parametrize("T,bs,S", [(150, 64, 8), (128, 64, 8), (129, 64, 1), (100, 16, 4), (64, 16, 1)])
def test_decode_mass_matches_whole_sequence_oracle(T, bs, S):
    """Decoding t = qb * bs .. T - 1 one token at a time (the carry accumulated by the reference step from
    the block start, starting from garbage) gives, at t = T - 1, the oracle's mass row of the last query
    block; the Triton step from the same carry selects what the oracle's masses select."""
    B, Hkv, G, d = 2, 2, 3, 16
    C = 4 * bs * ((T + 4 * bs - 1) // (4 * bs))
    gen = torch.Generator().manual_seed(T + S)
    qi = 2.0 * torch.randn(B, T, Hkv * G, d, generator=gen)
    ki = torch.randn(B, T, Hkv, d, generator=gen)
    oracle = block_mass_reference(qi, ki, block_size=bs, query_stride=S)  # [B, Hkv, NQB, NQB]
    nqb = oracle.shape[-1]
    ikeys = torch.full((B, Hkv, C, d), float("nan"))
    ikeys[:, :, :T] = ki.transpose(1, 2)
    queries = qi.view(B, T, Hkv, G, d).transpose(1, 2)  # [B, Hkv, T, G, d]: query head h * G + g
    qb = (T - 1) // bs
    carry = torch.rand(B, Hkv, C // bs, generator=gen)  # garbage: the block's first token must ignore it
    for t in range(qb * bs, T):
        pos = torch.full((B,), t, dtype=torch.int64)
        mass, next_carry = decode_block_mass_reference(queries[:, :, t], ikeys, pos, carry, block_size=bs,
                                                       query_stride=S)
        if t < T - 1:
            carry = next_carry
    torch.testing.assert_close(mass[..., :nqb], oracle[:, :, qb], atol=2e-6, rtol=1e-5)
    assert not mass[..., nqb:].any()

    top_p = 0.7
    chosen, _ = decode_block_select(queries[:, :, T - 1], ikeys, pos, carry, block_size=bs, top_p=top_p,
                                    query_stride=S, backend="triton")
    block_idx, block_cnt = select_blocks_from_mass(oracle, top_p=top_p)
    expected = torch.zeros_like(chosen)
    expected[..., :nqb] = mask_from_block_index(block_idx, block_cnt, nqb)[:, :, qb]
    assert_same_choice(chosen, expected, mass, (pos // bs).view(-1, 1), top_p=top_p, sink=1, local=2, exact=False)


def attention_inputs(B, H, G, D, C, bs, lengths, block_mask, dtype, seed):
    """q, k, v with NaN in every slot that must stay unread: past lengths[b] and in unchosen blocks."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, G, D, generator=gen)
    k = torch.randn(B, H, C, D, generator=gen)
    v = torch.randn(B, H, C, D, generator=gen)
    hidden = (torch.arange(C)[None, :] >= lengths[:, None])[:, None, :].expand(B, H, C)
    if block_mask is not None:
        hidden = hidden | ~block_mask.repeat_interleave(bs, dim=-1)[..., :C]
    k[hidden] = float("nan")
    v[hidden] = float("nan")
    return q.to(dtype), k.to(dtype), v.to(dtype)


ATTENTION_CASES = [  # B, H, G, D, C, block_size, dtype
    (3, 2, 1, 64, 256, 64, torch.float32),
    (2, 1, 3, 128, 200, 64, torch.bfloat16),  # C not a multiple of block_size
    (3, 1, 4, 64, 512, 16, torch.float16),
    (2, 2, 8, 128, 256, 32, torch.float32),
    (3, 1, 2, 64, 384, 128, torch.bfloat16),
]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("B,H,G,D,C,bs,dtype", ATTENTION_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_triton_attention_matches_reference(B, H, G, D, C, bs, dtype, masked):
    nb = -(-C // bs)
    gen = torch.Generator().manual_seed(C + G)
    sets = position_sets(B, C, bs, seed=D + G)  # lengths 0, 1, bs - 1, bs, bs + 1, 2 bs - 1, C - 1, random
    sets[-1][-1] = C  # a full cache
    for i, lengths in enumerate(sets):
        block_mask = None
        if masked:
            block_mask = torch.rand(B, H, nb, generator=gen) < 0.5
            block_mask[-1, -1] = False  # a row that sees nothing although its length is not 0
        q, k, v = attention_inputs(B, H, G, D, C, bs, lengths, block_mask, dtype, seed=i)
        ref = decode_attention_reference(q, k, v, lengths, block_mask, block_size=bs)
        assert not ref.isnan().any()
        for splits in (None, 3):
            if splits is None:
                got = decode_attention(q, k, v, lengths, block_mask, block_size=bs, backend="triton")
            else:
                got = attention_triton.decode_attention_triton(q, k, v, lengths, block_mask, block_size=bs,
                                                               num_splits=splits)
            assert got.dtype == dtype and got.shape == (B, H, G, D)
            torch.testing.assert_close(got.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
            assert not got[lengths == 0].any(), "a row with no key gives 0"
            if masked:
                assert not got[-1, -1].any(), "a row with no chosen block gives 0"


def test_triton_attention_strided_cache_view():
    """A cache view strided in batch and head (a slice of a larger buffer) is read in place."""
    B, H, G, D, C, bs = 2, 2, 4, 64, 128, 16
    lengths = torch.tensor([77, 128])
    q, k, v = attention_inputs(B, H, G, D, C, bs, lengths, None, torch.float32, seed=5)
    big_k = torch.full((B, 2 * H, C, D), float("nan"))
    big_v = torch.full((B, 2 * H, C, D), float("nan"))
    big_k[:, 1::2], big_v[:, 1::2] = k, v
    ref = decode_attention_reference(q, k, v, lengths, block_size=bs)
    got = decode_attention(q, big_k[:, 1::2], big_v[:, 1::2], lengths, block_size=bs, backend="triton")
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("H", [2, 4, 8, 12])
@pytest.mark.parametrize("C", [8192, 32768, 139264])
def test_split_rules_fill_the_gpu_at_batch_one(H, C):
    """Graph safety: split counts are functions of the shapes; at batch 1 they give >= ~1 program per SM."""
    cpu = torch.device("cpu")
    per_split, splits = attention_triton.attention_splits(1, H, C // 64, cpu)
    assert per_split * splits >= C // 64 > per_split * (splits - 1)
    assert H * splits >= 0.95 * attention_triton.DEFAULT_SMS
    nb_tile, blocks_per_split, key_splits = select_triton.select_launch(1, H, C // 64, 64, cpu)
    assert blocks_per_split % nb_tile == 0 and blocks_per_split * key_splits >= C // 64
    assert H * key_splits >= 0.95 * select_triton.DEFAULT_SMS


def test_clear_errors_for_unsupported_inputs():
    q = torch.randn(1, 1, 2, 48)
    kv = torch.randn(1, 1, 64, 48)
    with pytest.raises(ValueError, match="head dims"):
        decode_attention(q, kv, kv, torch.tensor([10]), block_size=16, backend="triton")
    q = torch.randn(1, 1, 2, 64).half()
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q, kv[..., :16].repeat(1, 1, 1, 4), kv[..., :16].repeat(1, 1, 1, 4), torch.tensor([10]),
                         block_size=16, backend="triton")
    nkb = select_triton.MAX_BLOCKS + 1
    qi, ik = torch.randn(1, 1, 1, 16), torch.empty(1, 1, nkb * 16, 16)
    with pytest.raises(ValueError, match="registers"):
        decode_block_select(qi, ik, torch.tensor([5]), torch.zeros(1, 1, nkb), block_size=16, backend="triton")
