"""Export -> reload: the sparse loader reproduces the training-time sparse model, the plain loader the dense one."""
import json

import pytest
import torch
from safetensors import safe_open

from rtpurbo_train.export import export_model
from rtpurbo_train.plan import SparsityPlan

from .tiny_sparse import load, random_ids, sparse_model, training_logits

T = 150  # 10 query blocks of 16; window 24 < T


def _greedy_no_cache(model, ids, steps):
    """Reference greedy decoding: a full no-cache forward per new token."""
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("family,retrieval,query_stride", [("llama", (1,), 8), ("qwen3", (0,), 1), ("llama", (1,), 4)])
def test_sparse_and_plain_reload_match_training_model(tmp_path, family, retrieval, query_stride):
    # query_stride 8 is the default (2 of a 16-token block's rows), 1 the exact selection.
    model, runtime, plan, tok = sparse_model(family, retrieval=retrieval, query_stride=query_stride)
    ids = random_ids(T)
    want_sparse = training_logits(model, runtime, ids, "sparse")
    want_dense = training_logits(model, runtime, ids, "full")
    assert (want_sparse - want_dense).abs().max() > 1e-2, "the plan must make sparse differ from dense"

    out = export_model(model, tok, plan, tmp_path / "export", dtype="float32")

    sparse = load(out, sparse=True)
    assert type(sparse).__name__ == f"RTPurbo{type(model).__name__}"
    with torch.no_grad():
        got = sparse(ids, use_cache=False).logits
        got_cached_prefill = sparse(ids).logits  # through the cache-writing path
    torch.testing.assert_close(got, want_sparse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_cached_prefill, want_sparse, atol=1e-4, rtol=1e-4)

    plain = load(out, sparse=False)
    assert type(plain) is type(model)  # the stock transformers class
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want_dense, atol=1e-4, rtol=1e-4)

    # The remote class was not registered for the native config class: a plain load still gets the base class.
    assert type(load(out, sparse=False)) is type(model)


def test_folder_layout_and_config(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", retrieval=(1,), seqlen_threshold=0)
    out = export_model(model, tok, plan, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "rtpurbo_indexer.safetensors", "generation_config.json",
            "tokenizer.json", "configuration_rtpurbo.py", "modeling_rtpurbo.py", "cache_rtpurbo.py",
            "plan.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name != "export"], "no temporary folder left behind"

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_rtpurbo.RTPurboLlamaForCausalLM"}
    assert "AutoConfig" not in config["auto_map"]
    assert config["dtype"] == "bfloat16"
    hw = config["headwise_config"]
    assert (hw["sink_token_num"], hw["swa_token_num"], hw["seqlen_threshold"]) == (4, 24, 0)
    # KV head 1 of 2 is the retrieval head: query heads 2, 3 of 4 (G = 2).
    assert [hw[str(i)] for i in range(3)] == [[0, 0, 1, 1]] * 3
    assert config["rtpurbo"]["plan"] == json.loads((out / "plan.json").read_text())
    assert config["rtpurbo"]["plan"]["query_stride"] == plan.query_stride

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        base_keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert not [k for k in base_keys if "indexer" in k]
    with safe_open(str(out / "rtpurbo_indexer.safetensors"), framework="pt") as f:
        indexer = {k: f.get_tensor(k) for k in f.keys()}
    assert set(indexer) == {f"model.layers.{i}.self_attn.indexer.{w}.weight" for i in range(3) for w in ("wq", "wk")}
    trained = model.model.layers[2].self_attn.indexer
    assert torch.equal(indexer["model.layers.2.self_attn.indexer.wq.weight"], trained.wq.weight.detach().bfloat16())
    assert indexer["model.layers.2.self_attn.indexer.wk.weight"].shape == (1, 16, 64)


def test_greedy_generate_both_loaders(tmp_path):
    # top_p = 1 keeps every causal block on retrieval heads, so cached decoding must agree with the no-cache
    # forward token for token (streaming heads evict from their cache, window 24 < length).
    model, runtime, plan, tok = sparse_model("llama", retrieval=(1,), top_p=1.0)
    out = export_model(model, tok, plan, tmp_path / "export", dtype="float32")
    prompt, steps = random_ids(37, seed=3), 24
    with torch.no_grad():
        sparse_tokens = load(out, sparse=True).generate(prompt, max_new_tokens=steps, do_sample=False)
        plain_tokens = load(out, sparse=False).generate(prompt, max_new_tokens=steps, do_sample=False)
    with runtime.use_mode("sparse"):
        assert torch.equal(sparse_tokens, _greedy_no_cache(model, prompt, steps))
    with runtime.use_mode("full"):
        dense_tokens = _greedy_no_cache(model, prompt, steps)
    assert torch.equal(plain_tokens, dense_tokens)
    assert not torch.equal(sparse_tokens, dense_tokens), "window 24 < length: sparse must differ from dense"


def test_sharded_export_reloads(tmp_path):
    model, runtime, plan, tok = sparse_model("qwen3", retrieval=(0, 1))
    whole = export_model(model, tok, plan, tmp_path / "whole")
    sharded = export_model(model, tok, plan, tmp_path / "sharded", max_shard_size=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((sharded / s).is_file() for s in shards)
    assert not [k for k in index["weight_map"] if "indexer" in k]
    ids = random_ids(90)
    for sparse in (True, False):
        with torch.no_grad():
            a = load(whole, sparse).forward(ids).logits
            b = load(sharded, sparse).forward(ids).logits
        assert torch.equal(a, b)


def test_seqlen_threshold_runs_short_prompts_dense(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", retrieval=(1,), seqlen_threshold=T + 1)
    out = export_model(model, tok, plan, tmp_path / "export", dtype="float32")
    sparse = load(out, sparse=True)
    ids = random_ids(T + 1)
    with torch.no_grad():
        short = sparse(ids[:, :T], use_cache=False).logits
        long = sparse(ids, use_cache=False).logits
    torch.testing.assert_close(short, training_logits(model, runtime, ids[:, :T], "full"), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # below the threshold the sparse load runs the plain model's own attention
        assert torch.equal(short, load(out, sparse=False)(ids[:, :T], use_cache=False).logits)
    torch.testing.assert_close(long, training_logits(model, runtime, ids, "sparse"), atol=1e-4, rtol=1e-4)
    sparse.set_sparse(False)  # the same model run densely at any length
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, training_logits(model, runtime, ids, "full"), atol=1e-4, rtol=1e-4)


def test_loaded_sparse_model_resaves_and_reexports_in_the_same_layout(tmp_path):
    model, runtime, plan, tok = sparse_model("llama", layers=2, retrieval=(0,))
    out = export_model(model, tok, plan, tmp_path / "export", dtype="float32")
    loaded = load(out, sparse=True)
    ids = random_ids(80)
    want = training_logits(model, runtime, ids, "sparse")

    loaded.save_pretrained(tmp_path / "resaved")
    tok.save_pretrained(tmp_path / "resaved")
    again = export_model(loaded, tok, SparsityPlan.model_validate(loaded.config.rtpurbo["plan"]), tmp_path / "again",
                         dtype="float32")
    for folder in (tmp_path / "resaved", again):
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            assert not [k for k in f.keys() if "indexer" in k]
        with torch.no_grad():
            torch.testing.assert_close(load(folder, sparse=True)(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_remote_code_is_self_contained():
    """The shipped files import only the standard library, torch, transformers (and safetensors, which
    transformers itself requires) and each other; rtpurbo_kernels only lazily, when installed."""
    import ast
    import sys
    from pathlib import Path

    from rtpurbo_train.export.writer import REMOTE_CODE_DIR, REMOTE_CODE_FILES

    allowed = {"torch", "transformers", "safetensors"}
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((Path(REMOTE_CODE_DIR) / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: another shipped file
                    assert f"{node.module}.py" in REMOTE_CODE_FILES, (name, node.module)
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed or root in sys.stdlib_module_names, (name, root)
