import torch

from rtpurbo_train.attention import attach_sparsity, attention_modules
from rtpurbo_train.attention.rope import undo_rope
from rtpurbo_train.models import ModelConfig, load_model
from rtpurbo_train.plan import HeadLayout, SparsityPlan


def test_undo_rope_recovers_the_projection_output():
    """Against the model's own pre-RoPE tensors: q_norm output for Qwen3 (k_proj output for Llama)."""
    for family, source in (("tiny-qwen3", "k_norm"), ("tiny-llama", "k_proj")):
        model, _ = load_model(ModelConfig(name_or_path=family))
        attn = attention_modules(model)[0]
        seen = {}
        getattr(attn, source).register_forward_hook(lambda m, a, out: seen.__setitem__("pre", out))

        def capture(module, query, key, value, attention_mask, scaling=None, **kw):
            if module is attn:
                seen["post"] = key
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2), None

        from transformers import AttentionInterface
        AttentionInterface.register("capture_test", capture)
        model.set_attn_implementation("capture_test")
        stash = {}
        attn.register_forward_pre_hook(lambda m, a, kw: stash.__setitem__("rope", kw["position_embeddings"]),
                                       with_kwargs=True)
        ids = torch.randint(0, model.config.vocab_size, (1, 40))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        cos, sin = stash["rope"]
        pre = seen["pre"].view(1, 40, -1, 64).transpose(1, 2)
        torch.testing.assert_close(undo_rope(seen["post"], cos, sin), pre, atol=1e-5, rtol=1e-5)


def test_indexer_kl_reaches_only_indexer_parameters():
    model, _ = load_model(ModelConfig(name_or_path="tiny-llama"))
    plan = SparsityPlan.uniform(HeadLayout.from_config(model.config), [1], window=32)
    runtime = attach_sparsity(model, plan, backend="reference")
    runtime.indexer_kl = True
    ids = torch.randint(0, model.config.vocab_size, (1, 130))
    with runtime.use_mode("full"):
        model(input_ids=ids, use_cache=False)
    loss = runtime.mean_of("indexer_kl")
    assert loss is not None and loss.item() > 0
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {n for n, _ in model.named_parameters() if ".indexer." in n}
    assert len(with_grad) == 2 * model.config.num_hidden_layers


def test_indexer_shapes_follow_the_plan():
    model, _ = load_model(ModelConfig(name_or_path="tiny-llama", overrides={"num_attention_heads": 6, "hidden_size": 384,
                                                                             "num_key_value_heads": 3}))
    layout = HeadLayout.from_config(model.config)
    plan = SparsityPlan.from_scores(layout, [[0.0] * 6, [0.0, 0.0, 0.0, 0.0, 0.9, 0.1]], 1 / 6, indexer_dim=8)
    attach_sparsity(model, plan)
    mods = attention_modules(model)
    assert not hasattr(mods[0], "indexer")  # no retrieval head chosen in layer 0
    assert mods[1].indexer.wq.weight.shape == (2, 8, 64) and mods[1].indexer.wk.weight.shape == (1, 8, 64)
    assert plan.retrieval_q_heads(1) == [4, 5]
