"""The training attention hands the plan's query stride to the selection and the stage's KL stride to
the indexer KL; evaluation (`runtime.exact_kl`) measures the KL on every query block."""
import torch

import rtpurbo_kernels
from rtpurbo_kernels.indexer_kl import indexer_kl_loss_reference
from rtpurbo_train.attention import attach_sparsity
from rtpurbo_train.models import ModelConfig, load_model
from rtpurbo_train.plan import HeadLayout, SparsityPlan


def test_strides_reach_the_kernels_and_evaluation_is_exact(monkeypatch):
    model, _ = load_model(ModelConfig(name_or_path="tiny-llama", seed=3))
    plan = SparsityPlan.uniform(HeadLayout.from_config(model.config), [0], window=32, sink_tokens=4, top_p=0.7,
                                query_stride=4)
    runtime = attach_sparsity(model, plan, backend="reference", seed=1)
    seen = {"select": [], "kl": []}
    select, kl = rtpurbo_kernels.indexer_block_select, rtpurbo_kernels.indexer_kl_loss

    def spy_select(*a, **kw):
        seen["select"].append(kw["query_stride"])
        return select(*a, **kw)

    def spy_kl(q, k, qi, ki, **kw):
        seen["kl"].append(kw["query_block_stride"])
        out = kl(q, k, qi, ki, **kw)
        # the value is the reference's at that stride
        ref = indexer_kl_loss_reference(q, k, qi.detach(), ki.detach(), **{x: v for x, v in kw.items() if x != "backend"})
        torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-5)
        return out

    monkeypatch.setattr(rtpurbo_kernels, "indexer_block_select", spy_select)
    monkeypatch.setattr(rtpurbo_kernels, "indexer_kl_loss", spy_kl)
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    runtime.set_mode("sparse")
    runtime.indexer_kl, runtime.indexer_kl_stride = True, 2
    with torch.no_grad():
        model(ids, use_cache=False)
        strided_kl = runtime.mean_of("indexer_kl")
        with runtime.exact_kl():
            model(ids, use_cache=False)
        exact_kl = runtime.mean_of("indexer_kl")
    layers = model.config.num_hidden_layers
    assert seen["select"] == [4] * (2 * layers)
    assert seen["kl"] == [2] * layers + [1] * layers
    assert runtime.indexer_kl_stride == 2  # restored after the evaluation
    assert not torch.equal(strided_kl, exact_kl)
