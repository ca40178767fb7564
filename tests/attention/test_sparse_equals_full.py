"""Invariant: sparse mode with window >= T and top_p = 1.0 equals full attention (outputs and grads)."""
import pytest
import torch

from rtpurbo_train.attention import attach_sparsity
from rtpurbo_train.models import ModelConfig, load_model
from rtpurbo_train.plan import HeadLayout, SparsityPlan


def _model(name, **overrides):
    model, _ = load_model(ModelConfig(name_or_path=name, overrides=overrides, seed=3))
    return model.train()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,overrides", [
    ("tiny-llama", {}),
    ("tiny-qwen2", {"num_attention_heads": 6, "num_key_value_heads": 2}),
    ("tiny-qwen3", {}),
    ("tiny-mistral", {"num_attention_heads": 4, "num_key_value_heads": 1}),
])
def test_sparse_with_everything_selected_equals_full(family, overrides):
    T = 150  # three blocks, the last one partial
    model = _model(family, **overrides)
    layout = HeadLayout.from_config(model.config)
    plan = SparsityPlan.uniform(layout, [0], window=T + 7, sink_tokens=4, top_p=1.0)
    runtime = attach_sparsity(model, plan, backend="reference", seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))

    results = {}
    for mode in ("full", "sparse"):
        model.zero_grad(set_to_none=True)
        with runtime.use_mode(mode):
            logits = model(input_ids=ids, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        results[mode] = (logits.detach(), _grads(model))
    full_logits, full_grads = results["full"]
    sparse_logits, sparse_grads = results["sparse"]
    torch.testing.assert_close(sparse_logits, full_logits, atol=2e-5, rtol=1e-4)
    backbone = [n for n in full_grads if ".indexer." not in n]
    assert backbone and set(backbone) <= set(sparse_grads)
    for name in backbone:
        torch.testing.assert_close(sparse_grads[name], full_grads[name], atol=2e-5, rtol=1e-3, msg=name)


def test_small_window_changes_the_output():
    """The converse: a real window must change the result (so the test above can fail)."""
    T = 200
    model = _model("tiny-llama")
    plan = SparsityPlan.uniform(HeadLayout.from_config(model.config), [0], window=64, sink_tokens=4, top_p=0.5)
    runtime = attach_sparsity(model, plan, backend="reference")
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with runtime.use_mode("full"):
            full = model(input_ids=ids, use_cache=False).logits
        with runtime.use_mode("sparse"):
            sparse = model(input_ids=ids, use_cache=False).logits
    # the first block sees the same keys either way; later tokens lose keys
    torch.testing.assert_close(sparse[:, :64], full[:, :64], atol=2e-5, rtol=1e-4)
    assert (sparse[:, 128:] - full[:, 128:]).abs().max() > 1e-3


@pytest.mark.parametrize("retrieval_window,equal", [(None, True), (0, False)])
def test_retrieval_window_covering_the_sequence_equals_full(retrieval_window, equal):
    """Retrieval heads keep sink + window + selected blocks: with both windows covering the sequence every
    head sees every key, however few blocks top-k picks; without the retrieval window, top-k 1 drops keys."""
    T = 300  # five blocks: sink 0, local 3 and 4, and top-k picks one of 1 and 2
    model = _model("tiny-llama")
    plan = SparsityPlan.uniform(HeadLayout.from_config(model.config), [0], window=T + 7, sink_tokens=4, top_k=1,
                                retrieval_window=T + 7 if retrieval_window is None else retrieval_window)
    runtime = attach_sparsity(model, plan, backend="reference", seed=1)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {}
        for mode in ("full", "sparse"):
            with runtime.use_mode(mode):
                logits[mode] = model(input_ids=ids, use_cache=False).logits
    if equal:
        torch.testing.assert_close(logits["sparse"], logits["full"], atol=2e-5, rtol=1e-4)
    else:
        assert (logits["sparse"] - logits["full"]).abs().max() > 1e-3


def test_sparse_attention_does_not_ask_for_lse(monkeypatch):
    """The layers never read the kernel's lse, so they ask for none (the reference backend then skips its
    second pass over the scores)."""
    import rtpurbo_kernels

    kernel, asked = rtpurbo_kernels.block_sparse_attention, []

    def spy(*args, **kwargs):
        asked.append(kwargs.get("return_lse", True))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(rtpurbo_kernels, "block_sparse_attention", spy)
    model = _model("tiny-llama")
    runtime = attach_sparsity(model, SparsityPlan.uniform(HeadLayout.from_config(model.config), [0], window=64),
                              backend="reference")
    with torch.no_grad(), runtime.use_mode("sparse"):
        model(input_ids=torch.zeros(1, 130, dtype=torch.long), use_cache=False)
    assert asked and not any(asked)
