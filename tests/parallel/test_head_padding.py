"""Zero-weight KV heads for sequence parallelism (parallel/head_padding.py): an exact change of the model
that training keeps exact, and that export removes."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rtpurbo_train.attention import attach_sparsity, attention_modules
from rtpurbo_train.export import export_model
from rtpurbo_train.models.tiny import build_tiny_model
from rtpurbo_train.parallel.head_padding import kv_heads_to_add, pad_kv_heads
from rtpurbo_train.plan import HeadLayout, SparsityPlan

THREE_KV = {"hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 64}  # 3 KV heads, as SmolLM2


@pytest.mark.parametrize("q,kv,sp,extra", [(9, 3, 2, 1), (9, 3, 4, 1), (9, 3, 3, 0), (12, 2, 4, 0), (14, 2, 4, 2),
                                           (28, 4, 8, 4), (28, 4, 7, 3)])
def test_kv_heads_to_add_is_the_fewest_that_ulysses_can_split(q, kv, sp, extra):
    assert kv_heads_to_add(q, kv, sp) == extra
    g, kv2 = q // kv, kv + extra
    assert (kv2 * g) % sp == 0 and (kv2 % sp == 0 or sp % kv2 == 0)


def model_and_plan(pad: int):
    model, tok = build_tiny_model("tiny-llama", THREE_KV, 5, torch.float32)
    plan = SparsityPlan.from_scores(HeadLayout.from_config(model.config), [[0.9, 0, 0, 0, 0.5, 0], [0, 0, 0.7, 0, 0, 0]],
                                    0.34, window=64, sink_tokens=4, top_p=0.8)
    if pad:
        plan = plan.with_padding(pad)
        pad_kv_heads(attention_modules(model), model.config, pad, plan.model.group, plan.model.head_dim)
    runtime = attach_sparsity(model, plan, backend="reference", seed=5)
    runtime.set_mode("sparse")
    return model, tok, plan


def test_padded_model_computes_the_same_and_its_padding_gets_no_gradient():
    ids = torch.randint(3, 200, (1, 200), generator=torch.Generator().manual_seed(1))
    grads = {}
    logits = {}
    for pad in (0, 1):
        model, _, plan = model_and_plan(pad)
        assert model.config.num_key_value_heads == 3 + pad and plan.padded_kv_heads == pad
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        logits[pad] = out.logits.detach()
        grads[pad] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
    D, G = 64, 2
    for name, g in grads[1].items():
        real = grads[0][name]
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            assert g[real.shape[0]:].abs().max() == 0, name  # the padded rows
            g = g[:real.shape[0]]
        elif name.endswith("o_proj.weight"):
            assert g[:, real.shape[1]:].abs().max() == 0, name  # the padded columns
            g = g[:, :real.shape[1]]
        torch.testing.assert_close(g, real, rtol=1e-4, atol=1e-6, msg=name)
    assert grads[1]["model.layers.0.self_attn.q_proj.weight"].shape[0] == 4 * G * D


def test_export_removes_the_padding(tmp_path):
    reference, tok, plan = model_and_plan(0)
    padded, _, padded_plan = model_and_plan(1)
    folder = export_model(padded, tok, padded_plan, tmp_path / "export", dtype="float32")
    saved = SparsityPlan.load(folder / "plan.json")
    assert saved.padded_kv_heads == 0 and saved.model == plan.model and saved.layers == plan.layers
    ids = torch.randint(3, 200, (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sparse = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert sparse.config.num_key_value_heads == 3
        torch.testing.assert_close(sparse(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
        assert plain.config.num_key_value_heads == 3 and plain.config.num_attention_heads == 6
        reference.set_attn_implementation("sdpa")  # dense: what an engine that ignores the sparsity runs
        torch.testing.assert_close(plain(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)
