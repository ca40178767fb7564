"""Retrieval-head balancing: the permutation, its exactness (permuted logits == original logits), and
the per-rank head slices."""
import pytest
import torch

from rtpurbo_train.attention import attach_sparsity, attention_modules
from rtpurbo_train.export.head_permutation import undo_kv_head_permutation
from rtpurbo_train.models.tiny import build_tiny_model
from rtpurbo_train.parallel import apply_kv_head_permutation, balanced_kv_head_permutation
from rtpurbo_train.parallel.head_balance import retrieval_per_rank
from rtpurbo_train.parallel.head_slices import localize_layer
from rtpurbo_train.plan import HeadLayout, LayerPlan, SparsityPlan

OVERRIDES = {"num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 3}


def _model(family="tiny-llama"):
    model, _ = build_tiny_model(family, OVERRIDES, seed=3, dtype=torch.float32)
    return model.eval()


def _plan(config, heads=([0, 1], [3], [0, 1, 2])):
    layers = [LayerPlan(retrieval_kv_heads=list(h)) for h in heads]
    return SparsityPlan(model=HeadLayout.from_config(config), layers=layers, window=64, sink_tokens=4, top_p=0.9)


def test_balanced_permutation_evens_out_retrieval_heads_per_rank():
    plan = _plan(_model().config)
    assert retrieval_per_rank(plan, None, 2) == [[2, 0], [0, 1], [2, 1]]
    perm = balanced_kv_head_permutation(plan, 2)
    counts = retrieval_per_rank(plan, perm, 2)
    assert all(max(c) - min(c) <= 1 for c in counts)
    assert counts[0] == [1, 1]
    totals = [sum(c[r] for c in counts) for r in range(2)]
    assert max(totals) - min(totals) <= 1  # the odd heads alternate between ranks
    for p in perm:
        assert sorted(p) == [0, 1, 2, 3]
    # nothing to move -> no permutation; SP that replicates KV heads -> none either
    assert balanced_kv_head_permutation(_plan(_model().config, ([0, 2], [1], [3])), 2) is None
    assert balanced_kv_head_permutation(plan, 4) is None


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_permuted_model_logits_equal_the_original(family, mode):
    """The permuted weights + permuted plan compute the same logits (and indexer KL) as the original."""
    plan = _plan(_model(family).config)
    perm = balanced_kv_head_permutation(plan, 2)
    ids = torch.randint(3, 200, (2, 320), generator=torch.Generator().manual_seed(0))

    def logits(model, p):
        runtime = attach_sparsity(model, p, backend="reference", seed=11)
        runtime.set_mode(mode)
        runtime.indexer_kl = True
        runtime.begin_step(0)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False).logits
        return out, runtime.mean_of("indexer_kl")

    base, kl_base = logits(_model(family), plan)
    permuted_model = _model(family)
    apply_kv_head_permutation(attention_modules(permuted_model), perm, plan.model.group, plan.model.head_dim)
    permuted, kl_perm = logits(permuted_model, plan.model_copy(update={"kv_head_permutation": perm}))
    assert not torch.equal(attention_modules(permuted_model)[0].k_proj.weight, attention_modules(_model(family))[0].k_proj.weight)
    torch.testing.assert_close(permuted, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_perm, kl_base, rtol=1e-5, atol=1e-7)

    # export's undo brings every weight (indexer included) back to the original model's
    indexer = {n: p.data for n, p in permuted_model.named_parameters() if ".indexer." in n}
    undo_kv_head_permutation(attention_modules(permuted_model), indexer, [plan.retrieval_kv_heads(i) for i in range(3)],
                             perm, plan.model.group, plan.model.head_dim)
    original = _model(family)
    attach_sparsity(original, plan, backend="reference", seed=11)
    for name, p in original.named_parameters():
        torch.testing.assert_close(indexer.get(name, dict(permuted_model.named_parameters())[name]), p, rtol=0, atol=0)


def test_localized_layer_slices_heads_and_indexer_rows():
    model = _model()
    plan = _plan(model.config)
    runtime = attach_sparsity(model, plan, backend="reference")
    layer = runtime.layers[2]  # retrieval KV 0, 1, 2 of 4; group 2
    r0 = localize_layer(layer, 8, 4, 0, 2)
    r1 = localize_layer(layer, 8, 4, 1, 2)
    assert r0.retrieval_kv.tolist() == [0, 1] and r1.retrieval_kv.tolist() == [0]
    assert r0.indexer_k_rows.tolist() == [0, 1] and r1.indexer_k_rows.tolist() == [2]
    assert r0.indexer_q_rows.tolist() == [0, 1, 2, 3] and r1.indexer_q_rows.tolist() == [4, 5]
    assert r1.retrieval_q.tolist() == [0, 1] and r1.streaming_kv.tolist() == [1]
    assert r0.kl_share + r1.kl_share == pytest.approx(1.0) and r0.kl_share == pytest.approx(4 / 6)
    assert r1.kv_window.tolist() == [0, plan.window]
    # SP 8 > 4 KV heads: each rank one replicated KV head and half of its query group
    r5 = localize_layer(layer, 8, 4, 5, 8)
    assert r5.retrieval_kv.tolist() == [0] and r5.indexer_k_rows.tolist() == [2] and r5.indexer_q_rows.tolist() == [5]
