"""What export accepts: peft LoRA models (merged), head-permuted models (undone), and clear errors otherwise."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from rtpurbo_train.errors import UserError
from rtpurbo_train.export import export_model

from .tiny_sparse import load, random_ids, sparse_model, training_logits


def test_lora_model_is_exported_merged_and_left_untouched(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", retrieval=(1,))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained adapter is not
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    q0 = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    base_before = q0.base_layer.weight.detach().clone()
    ids = random_ids(120)
    want = training_logits(peft_model, runtime, ids, "sparse")

    out = export_model(peft_model, tok, plan, tmp_path / "export", dtype="float32")

    # The adapter merged by hand: W + (alpha / r) * B @ A.
    merged = base_before + 2.0 * q0.lora_B["default"].weight.detach() @ q0.lora_A["default"].weight.detach()
    weights = load_file(str(out / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or "base_layer" in k]
    torch.testing.assert_close(weights["model.layers.0.self_attn.q_proj.weight"], merged, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(load(out, sparse=True)(ids).logits, want, atol=1e-4, rtol=1e-4)
    # The training model still has its adapter and unmerged base weights.
    assert torch.equal(q0.base_layer.weight, base_before) and "default" in q0.lora_A


class EngineLike(torch.nn.Module):
    """Like DeepSpeed's engine: holds the model as `.module` and has a `config` of its own."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.config = {"train_batch_size": 8}


def test_wrapped_model_is_unwrapped(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", layers=2, retrieval=(1,))
    ids = random_ids(70)
    out = export_model(EngineLike(EngineLike(model)), tok, plan, tmp_path / "export", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(load(out, sparse=True)(ids).logits, training_logits(model, runtime, ids, "sparse"),
                                   atol=1e-4, rtol=1e-4)


def _permute_heads(model, perm, group, head_dim):
    """Apply a KV-head permutation the way sequence-parallel balancing would (see head_permutation.py):
    slot s <- original KV head perm[i][s] (and its query heads); indexer rows in ascending slot order."""
    for i, layer in enumerate(model.model.layers):
        attn, p = layer.self_attn, torch.tensor(perm[i])
        q_heads = (p[:, None] * group + torch.arange(group)).reshape(-1)
        with torch.no_grad():
            for proj, heads, dim in ((attn.q_proj, q_heads, 0), (attn.k_proj, p, 0), (attn.v_proj, p, 0),
                                     (attn.o_proj, q_heads, 1)):
                idx = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
                proj.weight.copy_(proj.weight.index_select(dim, idx))


def test_head_permutation_is_undone(tmp_path):
    original, runtime, plan, tok = sparse_model("llama", heads=8, kv_heads=4, retrieval=(0, 3))
    ids = random_ids(120)
    want = training_logits(original, runtime, ids, "sparse")
    reference = export_model(original, tok, plan, tmp_path / "reference", dtype="float32")

    permuted, runtime_p, _, _ = sparse_model("llama", heads=8, kv_heads=4, retrieval=(0, 3))
    perm = [[3, 1, 0, 2], [2, 0, 3, 1], [0, 1, 2, 3]]
    _permute_heads(permuted, perm, group=2, head_dim=64)
    # Retrieval heads (0, 3) sit in slots (2, 0), (1, 2), (0, 3): indexer rows follow ascending slots.
    with torch.no_grad():
        for i, slots_to_original in enumerate(([3, 0], [0, 3], [0, 3])):
            src, dst = original.model.layers[i].self_attn.indexer, permuted.model.layers[i].self_attn.indexer
            order = torch.tensor([[0, 3].index(h) for h in slots_to_original])
            dst.wk.weight.copy_(src.wk.weight[order])
            dst.wq.weight.copy_(src.wq.weight.view(2, 2, 16, 64)[order].reshape(4, 16, 64))
    with runtime_p.use_mode("full"), runtime.use_mode("full"), torch.no_grad():
        # A head permutation leaves the dense function unchanged (sanity check of the permuted model).
        torch.testing.assert_close(permuted(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)

    plan_p = plan.model_copy(update={"kv_head_permutation": perm})
    out = export_model(permuted, tok, plan_p, tmp_path / "permuted", dtype="float32")
    for name in ("model.safetensors", "rtpurbo_indexer.safetensors"):
        got, expected = load_file(str(out / name)), load_file(str(reference / name))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), name
    assert json.loads((out / "config.json").read_text())["rtpurbo"]["plan"]["kv_head_permutation"] is None
    with torch.no_grad():
        torch.testing.assert_close(load(out, sparse=True)(ids).logits, want, atol=1e-4, rtol=1e-4)

    with pytest.raises(UserError, match="not a permutation"):
        export_model(permuted, tok, plan.model_copy(update={"kv_head_permutation": [[0, 0, 1, 2]] * 3}),
                     tmp_path / "bad")


def test_bad_inputs_give_clear_errors(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", retrieval=(1,))
    out = tmp_path / "export"
    other, _, other_plan, _ = sparse_model("llama", layers=2, retrieval=(1,))
    with pytest.raises(UserError, match="sparsity plan was made for"):
        export_model(model, tok, other_plan, out)
    del model.model.layers[1].self_attn.indexer  # a partially restored checkpoint
    with pytest.raises(UserError, match="layer 1 .* no indexer"):
        export_model(model, tok, plan, out)
    with pytest.raises(UserError, match="dtype"):
        export_model(other, tok, other_plan, out, dtype="int8")
    with pytest.raises(UserError, match="tokenizer"):
        export_model(other, None, other_plan, out)
    assert not out.exists() and not list(tmp_path.iterdir())

    # A folder that is not an earlier export is never replaced.
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier export"):
        export_model(other, tok, other_plan, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_failed_export_leaves_nothing_and_reexport_replaces(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", layers=2, retrieval=(1,))
    out = export_model(model, tok, plan, tmp_path / "export")
    first = (out / "config.json").read_text()

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_model(model, BrokenTokenizer(), plan, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (out / "config.json").read_text() == first

    export_model(model, tok, plan.model_copy(update={"window": 32}), out)
    assert json.loads((out / "config.json").read_text())["headwise_config"]["swa_token_num"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_partial_export_folder_is_a_clear_error_on_load(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", layers=2, retrieval=(1,))
    out = export_model(model, tok, plan, tmp_path / "export")
    (out / "rtpurbo_indexer.safetensors").unlink()
    with pytest.raises(ValueError, match="rtpurbo_indexer.safetensors is missing"):
        load(out, sparse=True)
    load(out, sparse=False)  # the plain model never needed it
