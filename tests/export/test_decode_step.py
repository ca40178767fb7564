"""The exported model's decode step: no host<->device sync, no whole-cache copy, same results.

A sync cannot be observed on CPU directly, so the step runs with every op that would make the host wait for
the device turned into an error: Python-level `.item()/.tolist()/.nonzero()/bool()/int()/float()` on tensors,
and (through a dispatch mode, which also sees what C++ code calls) the aten ops behind them and behind
data-dependent shapes (`_local_scalar_dense`, `nonzero`, boolean-mask indexing, ...).
"""
import dataclasses

import pytest
import torch

from rtpurbo_train.export.remote_code.modeling_rtpurbo import select_blocks

from .tiny_sparse import random_ids, remote_model


@pytest.mark.parametrize("kv_heads,retrieval,settings", [
    (2, (1,), {"top_p": 0.6}),  # one streaming, one retrieval KV head: both taken as views
    (4, (0, 2), {"top_k": 2}),  # interleaved kinds: gathered and merged by index
    (2, (0, 1), {"top_p": 0.6}),  # retrieval heads only
    (2, (1,), {"top_p": 0.6, "query_stride": 1}),  # the exact selection: every row of a block
    (2, (1,), {"top_p": 0.6, "query_stride": 16}),  # one row per full block: its last
    (2, (1,), {"top_p": 0.6, "seqlen_threshold": 1000}),  # a short prompt: dense mode
])
def test_decode_steps_do_not_sync_and_match_the_no_cache_forward(monkeypatch, forbid_host_sync, forbid_python_syncs,
                                                                 kv_heads, retrieval, settings):
    # One layer: every cached step then equals the no-cache forward over its prefix (test_sparse_decode.py).
    model = remote_model(layers=1, heads=2 * kv_heads, kv_heads=kv_heads, retrieval=retrieval, **settings)
    ids = random_ids(52, seed=4)
    cache = model.make_cache()
    # From a 5-token prompt: the buffers grow, the streaming ring (sink 4 + window 24) fills and wraps, and
    # the steps cross the block edges at 16, 32 and 48.
    steps = range(5, 52)
    with torch.no_grad():
        model(ids[:, :5], past_key_values=cache)
        with monkeypatch.context() as patch:
            forbid_python_syncs(patch)
            with forbid_host_sync():
                got = [model(ids[:, t:t + 1], past_key_values=cache, attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                             logits_to_keep=1).logits[:, -1] for t in steps]
        for t, logits in zip(steps, got):
            want = model(ids[:, :t + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert cache.mode == ("dense" if "seqlen_threshold" in settings else "sparse")


def test_sync_guard_catches_a_sync(monkeypatch, forbid_host_sync, forbid_python_syncs):
    x = torch.tensor([0.0, 1.0])
    with forbid_host_sync(), pytest.raises(AssertionError, match="host sync"):
        x[x > 0]
    with monkeypatch.context() as patch:
        forbid_python_syncs(patch)
        with pytest.raises(AssertionError, match="host sync"):
            x.sum().item()


def _buffer_ptrs(layer):
    return {name: getattr(layer, name).data_ptr() for name in ("_full_k", "_full_v", "_ikeys", "_stream_k", "_stream_v")}


def test_appends_write_in_place_and_grow_by_doubling():
    model = remote_model(layers=1, retrieval=(1,), top_p=0.6)  # blocks of 16, sink 4, window 24
    ids = random_ids(100, seed=6)
    cache = model.make_cache()
    layer = cache.layers[0]

    def step(t):
        model(ids[:, t:t + 1], past_key_values=cache)

    with torch.no_grad():
        model(ids[:, :37], past_key_values=cache)
        assert layer._full_k.shape[2] == layer._ikeys.shape[2] == 48  # the prompt, in whole blocks
        assert layer._stream_k.shape[2] == 4 + 24  # streaming heads: at most sink + window slots, for good
        ptrs, prompt_keys = _buffer_ptrs(layer), layer.full_keys.clone()
        for t in range(37, 48):
            step(t)
            assert _buffer_ptrs(layer) == ptrs, f"a buffer was reallocated at step {t}"
        step(48)  # 49 tokens do not fit 48 slots: the full buffers double, once
        grown = _buffer_ptrs(layer)
        assert layer._full_k.shape[2] == layer._ikeys.shape[2] == 96
        assert {n for n in ptrs if grown[n] != ptrs[n]} == {"_full_k", "_full_v", "_ikeys"}
        assert torch.equal(layer.full_keys[:, :, :37], prompt_keys)
        for t in range(49, 96):
            step(t)
            assert _buffer_ptrs(layer) == grown, f"a buffer was reallocated at step {t}"
    assert layer.full_keys.shape[2] == 96 and layer._stream_k.shape[2] == 4 + 24
    assert sorted(layer.stream_pos.tolist()) == list(range(4)) + list(range(96 - 24, 96))
    # Live bytes: 96 tokens on the retrieval head, sink + window on the streaming head (1 KV head each).
    assert cache.kv_bytes() == (96 + 28) * 64 * 4 * 2
    assert cache.allocated_bytes() >= cache.kv_bytes() + cache.indexer_bytes()


def test_streaming_buffer_grows_to_sink_plus_window_only():
    model = remote_model(layers=1, retrieval=(1,), top_p=0.6)  # sink 4 + window 24
    ids = random_ids(60, seed=8)
    cache = model.make_cache()
    layer = cache.layers[0]
    sizes = []
    with torch.no_grad():
        model(ids[:, :10], past_key_values=cache)
        for t in range(10, 60):
            sizes.append(layer._stream_k.shape[2])
            model(ids[:, t:t + 1], past_key_values=cache)
    assert sorted(set(sizes)) == [16, 28]  # 10 tokens in one block of slots, then sink + window for good
    assert layer.stream_keys.shape[2] == 28 and layer.full_keys.shape[2] == 60


def test_generate_sizes_the_cache_once():
    model = remote_model(layers=2, retrieval=(1,), top_p=0.6)
    with torch.no_grad():
        out = model.generate(random_ids(37, seed=2), max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 77
    for layer in out.past_key_values.layers:
        assert layer._full_k.shape[2] == 80  # max_length 77 in whole blocks of 16: never regrown


def test_reorder_cache_equals_a_reordered_batch():
    model = remote_model(layers=2, retrieval=(1,), top_p=0.6)
    ids = torch.cat([random_ids(45, seed=1), random_ids(45, seed=2)])
    swap = torch.tensor([1, 0])

    def decode(prompt_rows, reorder):
        cache = model.make_cache()
        with torch.no_grad():
            model(ids[prompt_rows, :37], past_key_values=cache)
            if reorder is not None:
                cache.reorder_cache(reorder)
            return torch.cat([model(ids[swap, t:t + 1], past_key_values=cache).logits for t in range(37, 45)], dim=1)

    torch.testing.assert_close(decode(slice(None), swap), decode(swap, None), atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # beam search reorders the cache every step
        beams = model.generate(ids[:1, :37], num_beams=3, max_new_tokens=8, do_sample=False)
    assert beams.shape == (1, 45)


@pytest.mark.parametrize("overrides", [{"top_p": 0.6}, {"top_p": 1.0}, {"top_p": 0.3, "sink_blocks": 0, "local_blocks": 0},
                                       {"top_k": 3}, {"top_k": 9, "local_blocks": 1}])
def test_per_row_decode_selection_equals_one_row_at_a_time(overrides):
    # The decode step selects for one query block per row (rows at different positions), over the whole cache.
    base = remote_model(layers=1).rtpurbo_settings
    s = dataclasses.replace(base, **{"top_k": None, **overrides})
    gen = torch.Generator().manual_seed(3)
    nkb = 30
    q_blocks = torch.tensor([0, 1, 6, 29])
    # coarse values: many ties, which both must break by block index
    mass = torch.randint(0, 4, (4, 3, nkb), generator=gen).float()
    mass = mass / mass.sum(-1, keepdim=True).clamp(min=1)
    got = select_blocks(mass[:, :, None], q_blocks.view(4, 1, 1), s)[:, :, 0]
    for b, qb in enumerate(q_blocks.tolist()):
        want = select_blocks(mass[b:b + 1, :, None, :qb + 1], torch.tensor([qb]), s)[0, :, 0]
        assert torch.equal(got[b, :, :qb + 1], want)
        assert not got[b, :, qb + 1:].any()


def test_kernel_prefill_queues_without_host_sync(forbid_host_sync):
    # The exported prefill with rtpurbo_kernels: selection, merge into one block index, kv windows.
    import rtpurbo_kernels
    from types import SimpleNamespace

    from rtpurbo_train.export.remote_code.modeling_rtpurbo import kernel_prefill

    model = remote_model(layers=1, heads=4, kv_heads=2, retrieval=(1,), top_p=0.6)
    attn = model.model.layers[0].self_attn
    s, heads = attn.rtpurbo_settings, attn.rtpurbo_heads
    B, T, D, d = 1, 150, s.head_dim, attn.indexer.wk.weight.shape[0] // heads.count("kv")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (4, 2, 2))
    qi, ki = torch.randn(B, 1, 2, T, d, generator=gen), torch.randn(B, 1, T, d, generator=gen)
    seen = {}

    def attention(q, k, v, idx, cnt, **kw):
        seen.update(idx=idx, cnt=cnt, kv_window=kw["kv_window"])
        return torch.zeros_like(q), None

    select = lambda *a, **kw: rtpurbo_kernels.indexer_block_select(*a, **{**kw, "backend": "reference"})  # noqa: E731
    kern = SimpleNamespace(indexer_block_select=select, block_sparse_attention=attention,
                           streaming_block_index=rtpurbo_kernels.streaming_block_index,
                           merge_head_blocks=rtpurbo_kernels.merge_head_blocks)
    with forbid_host_sync():
        kernel_prefill(kern, q, k, v, qi, ki, heads, s, D ** -0.5, "reference")
    assert seen["kv_window"].tolist() == [s.window, 0]  # head 1 is the retrieval head: no window
    nqb = -(-T // s.block_size)
    for h in range(2):
        for qb in range(nqb):
            blocks = seen["idx"][0, h, qb, :seen["cnt"][0, h, qb]].tolist()
            assert blocks == sorted(set(blocks)) and all(0 <= kb <= qb for kb in blocks) and qb in blocks


@pytest.mark.parametrize("settings", [{"top_p": 0.6}, {"top_k": 2, "query_stride": 4}, {"seqlen_threshold": 1000}])
def test_decode_kernels_in_the_model_equal_the_pytorch_step(monkeypatch, settings):
    # The exported model's decode step through rtpurbo_kernels' Triton decode kernels (interpreter) vs its
    # own PyTorch step, on a ragged batch (rows at different positions) crossing block edges.
    import rtpurbo_kernels.sparse_decode as sparse_decode

    from .test_batched_decode import _left_padded

    model = remote_model(layers=1, heads=4, kv_heads=2, retrieval=(1,), **settings)
    ids, mask = _left_padded([random_ids(n, seed=n) for n in (30, 47)])
    steps = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))

    def run(backend):
        model.rtpurbo_options.backend = backend
        cache = model.make_cache()
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
            return torch.cat([model(steps[:, i:i + 1], past_key_values=cache).logits for i in range(12)], dim=1)

    want = run("torch")
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(sparse_decode, "resolve_backend", lambda backend, device: calls.append(backend) or "triton")
        got = run("kernels")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # every step ran the kernels: dense mode one attention, sparse mode two attentions and a selection
    assert len(calls) == 12 * (1 if "seqlen_threshold" in settings else 3)
