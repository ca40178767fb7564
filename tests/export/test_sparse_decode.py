"""Sparse decoding with the exported model's cache agrees with the no-cache sparse forward.

What is exact and what is not: a cached token selects key blocks from the mass of the sampled queries
of its query block seen so far (the strided ones) and its own, which is exactly what a no-cache forward
over the prefix computes for that (last, partial) block. But a no-cache forward over a LONGER sequence
gives the earlier tokens of a block other sampled block-mates than they had when they were decoded, so
their outputs (and the next layer's inputs) can differ. Hence:
- one attention layer on fixed inputs: every cached output equals the no-cache output of the prefix
  that ends at that token (decode steps and multi-token extends), for top-p and top-k;
- a one-layer model (the attention sees embeddings, which do not depend on earlier selections): step
  logits equal no-cache prefix logits, and greedy tokens are equal;
- several layers with top_p = 1 (retrieval heads keep every block): identical as well, which checks the
  streaming heads' eviction end to end (test_export_roundtrip.py, greedy generate).
"""
import pytest
import torch

from rtpurbo_train.export import export_model
from rtpurbo_train.export.hf_config import rtpurbo_section
from rtpurbo_train.export.remote_code import modeling_rtpurbo

from .tiny_sparse import load, make_plan, random_ids, randomize_indexers, sparse_model, tiny_config, training_logits


def _sparse_layer(**plan_settings):
    config = tiny_config("llama", layers=1, heads=4, kv_heads=2)
    config.rtpurbo = rtpurbo_section(make_plan(config, (1,), **plan_settings))
    torch.manual_seed(0)
    model = modeling_rtpurbo.RTPurboLlamaForCausalLM(config).eval()
    randomize_indexers(model, seed=1)  # peaked indexer distributions: selections differ between rows
    return model, model.model.layers[0].self_attn


@pytest.mark.parametrize("selection", [{"top_p": 0.6}, {"top_k": 2}, {"top_p": 0.6, "query_stride": 1},
                                       {"top_p": 0.6, "query_stride": 4}, {"top_p": 0.6, "retrieval_window": 20}])
def test_cached_attention_equals_no_cache_prefix(selection):
    model, attn = _sparse_layer(**selection)
    T = 100
    x = torch.randn(1, T, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    cos, sin = model.model.rotary_emb(x, position_ids=torch.arange(T)[None])

    def run(a, b, cache):
        with torch.no_grad():
            return attn(x[:, a:b], position_embeddings=(cos[:, a:b], sin[:, a:b]), attention_mask=None,
                        past_key_values=cache, rtpurbo_mode="sparse")[0]

    cache = model.make_cache()
    # prefill ending mid-block, single steps across a block edge, an extend crossing two blocks, steps.
    spans = [(0, 37)] + [(t, t + 1) for t in range(37, 52)] + [(52, 75)] + [(t, t + 1) for t in range(75, T)]
    checked = 0
    for a, b in spans:
        got = run(a, b, cache)
        want = run(0, b, None)[:, a:b]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        checked += b - a
    assert checked == T and cache.get_seq_length() == T
    # The selection really drops blocks here (else this test could not tell a wrong selection apart).
    with torch.no_grad():
        dense = attn(x, position_embeddings=(cos, sin), attention_mask=None, rtpurbo_mode="dense")[0]
    assert (dense - run(0, T, None)).abs().max() > 1e-2
    # The streaming head kept only sink + window tokens (window slots in a ring: any order); the retrieval
    # head every token.
    layer = cache.layers[0]
    assert layer.stream_keys.shape[2] == 4 + 24 and layer.full_keys.shape[2] == T
    assert sorted(layer.stream_pos.tolist()) == list(range(4)) + list(range(T - 24, T))


def test_chunked_prefill_equals_one_chunk(monkeypatch):
    """Long prompts run in chunks of query blocks; the chunk size must not change the result."""
    model, attn = _sparse_layer(top_p=0.6)
    T = 150
    x = torch.randn(1, T, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    cos, sin = model.model.rotary_emb(x, position_ids=torch.arange(T)[None])

    def run(a, b, cache):
        with torch.no_grad():
            return attn(x[:, a:b], position_embeddings=(cos[:, a:b], sin[:, a:b]), attention_mask=None,
                        past_key_values=cache, rtpurbo_mode="sparse")[0]

    whole = run(0, T, None)
    monkeypatch.setattr(modeling_rtpurbo, "SCORE_ELEMENTS_PER_CHUNK", 1)  # one query block per chunk
    torch.testing.assert_close(run(0, T, None), whole, atol=1e-5, rtol=1e-5)
    cache = model.make_cache()
    chunked = torch.cat([run(0, 37, cache), run(37, T, cache)], dim=1)  # an extend over several chunks
    torch.testing.assert_close(chunked[:, 37:], whole[:, 37:], atol=1e-5, rtol=1e-5)


def test_one_layer_model_decode_matches_no_cache_forward(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", layers=1, retrieval=(0,), top_p=0.6)
    out = export_model(model, tok, plan, tmp_path / "export", dtype="float32")
    sparse = load(out, sparse=True)
    prompt, steps = random_ids(45, seed=5), 30
    with torch.no_grad():
        generated = sparse.generate(prompt, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                                    output_logits=True)
    seq = generated.sequences
    for i, step_logits in enumerate(generated.logits):
        prefix = seq[:, :45 + i]
        want = training_logits(model, runtime, prefix, "sparse")[:, -1]
        torch.testing.assert_close(step_logits, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(seq[:, 45 + i], want.argmax(-1))


def test_kv_cache_bytes_follow_the_plan(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", layers=2, heads=8, kv_heads=4, retrieval=(2,),
                                             window=256, sink_tokens=4, top_p=0.9)
    out = export_model(model, tok, plan, tmp_path / "export", dtype="float32")
    T = 2048
    ids = random_ids(T, seed=7)
    with torch.no_grad():
        dense_cache = load(out, sparse=False)(ids, use_cache=True).past_key_values
        sparse_cache = load(out, sparse=True)(ids, use_cache=True, logits_to_keep=1).past_key_values
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense_cache.layers)
    assert dense_bytes == 2 * 4 * T * 64 * 4 * 2  # layers * kv heads * tokens * head_dim * fp32 * (k, v)
    fraction = plan.kv_cache_fraction(T)
    assert fraction == pytest.approx((1 + 3 * 260 / T) / 4)
    assert sparse_cache.kv_bytes() == round(fraction * dense_bytes)
    # The retrieval heads also cache their indexer keys (d = 16, float32); T is a whole number of blocks, so
    # no open block mass is kept.
    assert sparse_cache.indexer_bytes() == 2 * 1 * T * 16 * 4
    # kv_bytes counts live entries; the memory really held is the same: the streaming buffers have exactly
    # sink + window slots and a prefill of whole blocks fills the growing buffers to capacity.
    assert sparse_cache.allocated_bytes() == sparse_cache.kv_bytes() + sparse_cache.indexer_bytes()


@pytest.mark.parametrize("retrieval_window", [0, 40])
def test_kernel_path_matches_torch_path(tmp_path, retrieval_window):
    """`backend="kernels"` runs prefill through rtpurbo_kernels (their PyTorch reference on CPU)."""
    model, runtime, plan, tok = sparse_model("qwen3", retrieval=(0,), top_p=0.7, retrieval_window=retrieval_window)
    out = export_model(model, tok, plan, tmp_path / "export", dtype="float32")
    sparse = load(out, sparse=True)
    ids = random_ids(101, seed=9)
    results = {}
    for backend in ("torch", "kernels"):
        sparse.rtpurbo_options.backend = backend
        cache = sparse.make_cache()
        with torch.no_grad():
            prefill = sparse(ids[:, :-8], past_key_values=cache).logits
            steps = [sparse(ids[:, t:t + 1], past_key_values=cache).logits for t in range(93, 101)]
        results[backend] = (prefill, torch.cat(steps, dim=1), cache)
    torch.testing.assert_close(results["kernels"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["kernels"][1], results["torch"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["torch"][0], training_logits(model, runtime, ids[:, :-8], "sparse"),
                               atol=1e-4, rtol=1e-4)
    assert results["kernels"][2].kv_bytes() == results["torch"][2].kv_bytes()


@pytest.mark.parametrize("retrieval_window,equal", [(200, True), (0, False)])
def test_retrieval_window_in_the_exported_prefill_and_decode(retrieval_window, equal):
    """The exported model's retrieval heads keep sink + window + selected blocks in prefill and decode: with
    both windows covering the sequence the sparse model equals its dense mode, whatever top-k 1 picks."""
    from .tiny_sparse import remote_model

    model = remote_model(layers=2, window=200, retrieval_window=retrieval_window, top_k=1)
    ids = random_ids(120, seed=4)
    logits = {}
    for sparse in (True, False):
        model.rtpurbo_options.sparse = sparse
        cache = model.make_cache()
        with torch.no_grad():
            prefill = model(ids[:, :90], past_key_values=cache).logits
            steps = [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(90, 120)]
        logits[sparse] = torch.cat([prefill] + steps, dim=1)
    if equal:
        torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    else:
        assert (logits[True] - logits[False]).abs().max() > 1e-3
