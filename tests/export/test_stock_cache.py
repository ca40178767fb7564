"""A stock transformers cache on the exported sparse model: the plain model's own dense path for prompts that
run dense (below seqlen_threshold), a clear error for prompts that run sparse."""
import pytest
import torch
from transformers import DynamicCache, StaticCache

from rtpurbo_train.export import export_model

from .tiny_sparse import load, random_ids, sparse_model

T = 150  # 10 query blocks of 16; window 24 < T


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, _, plan, tok = sparse_model("llama", retrieval=(1,), seqlen_threshold=T + 1)
    return export_model(model, tok, plan, tmp_path_factory.mktemp("stock") / "export", dtype="float32")


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              return_dict_in_generate=True, output_scores=True, **kwargs)


def test_static_cache_below_threshold_is_the_plain_model(folder):
    ids = random_ids(T - 7, seed=5)
    sparse, plain = load(folder, sparse=True), load(folder, sparse=False)
    got = _generate(sparse, ids, cache_implementation="static")
    want = _generate(plain, ids, cache_implementation="static")
    assert isinstance(got.past_key_values, StaticCache)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):  # the same code path: bit-equal step logits
        assert torch.equal(a, b)


def test_filled_stock_cache_continues_densely(folder):
    # A DynamicCache filled by the plain load (dense) continues on the sparse load exactly as on the plain one.
    ids, nxt = random_ids(T - 7, seed=6), random_ids(1, seed=7)
    sparse, plain = load(folder, sparse=True), load(folder, sparse=False)
    with torch.no_grad():
        cache = plain(ids, use_cache=True).past_key_values
        again = plain(ids, use_cache=True).past_key_values
        got = sparse(nxt, past_key_values=cache, use_cache=True).logits
        want = plain(nxt, past_key_values=again, use_cache=True).logits
    assert torch.equal(got, want)
    assert cache.get_seq_length() == T - 6


def test_static_cache_above_threshold_is_refused(folder):
    sparse = load(folder, sparse=True)
    with pytest.raises(ValueError, match=r"seqlen_threshold 151.*cache_implementation"):
        _generate(sparse, random_ids(T + 3, seed=8), cache_implementation="static")


def test_empty_dynamic_cache_above_threshold_gets_the_rtpurbo_cache(folder):
    sparse = load(folder, sparse=True)
    ids = random_ids(T + 3, seed=9)
    with torch.no_grad():
        out = sparse(ids, past_key_values=DynamicCache(), use_cache=True)
        ref = sparse(ids, past_key_values=sparse.make_cache(), use_cache=True)
    assert type(out.past_key_values).__name__ == "RTPurboCache"
    assert torch.equal(out.logits, ref.logits)


def test_static_cache_decode_step_traces_as_one_graph(folder):
    # What transformers compiles for a static cache on a GPU: the decode step must trace without a graph
    # break (fullgraph=True), e.g. no branch on the StaticCache's tensor length. Backend "eager": dynamo only.
    from transformers import CompileConfig

    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # compile on CPU too (transformers compiles on GPUs only by default)
    ids = random_ids(T - 7, seed=10)
    torch._dynamo.reset()
    got = _generate(load(folder, sparse=True), ids, cache_implementation="static", compile_config=config)
    want = _generate(load(folder, sparse=False), ids, cache_implementation="static")
    assert torch.equal(got.sequences, want.sequences)
