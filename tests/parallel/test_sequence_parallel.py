"""Sequence parallelism through the deepspeed launcher on CPU (2 gloo ranks)."""
import json

import pytest

from tests.e2e.helpers import REPO, TINY, deepspeed_cmd, metrics, run

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "parity.json"
    cmd = deepspeed_cmd(2, "--out", str(out), script=REPO / "tests" / "parallel" / "sp_parity_worker.py")
    run(cmd, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["full", "sparse", "both"])
def test_sp1_sp2_parity_of_losses_and_gradients(parity, mode):
    """SP=2 (Ulysses, loader adapter, balanced head permutation, DeepSpeed, grad accumulation 2) against
    the single-process SP=1 path on the same two micro-batches, every loss of the mode on."""
    result = parity[mode]
    expected = {"lm", "distill", "indexer_kl"} | ({"ssa_align"} if mode == "both" else set())
    for ref, sp in zip(result["ref"], result["sp"], strict=True):
        assert set(ref) == set(sp) == expected
        for name in expected:
            assert sp[name] == pytest.approx(ref[name], rel=REL_TOL, abs=1e-7), (mode, name)
    assert not result["missing"], result["missing"]  # the same parameters got gradients
    worst = max(result["grad_rel_err"], key=result["grad_rel_err"].get)
    assert result["grad_rel_err"][worst] < REL_TOL, (worst, result["grad_rel_err"][worst])
    assert any(".indexer." in n for n in result["grad_rel_err"]) and result["grad_norm"] > 0


def test_two_rank_pipeline_runs_with_sequence_parallel_2(tmp_path):
    """`deepspeed --num_gpus 2 launch/train.py --recipe ... --set parallel.sequence_parallel_size=2` on the
    tiny recipe: every stage (calibrate, warm-up, sparse `both` training with all losses, export, evaluate)."""
    out = tmp_path / "run"
    proc = run(deepspeed_cmd(2, "--recipe", str(TINY), "--output-dir", str(out), "--set",
                             "parallel.sequence_parallel_size=2"), timeout=900)
    assert (out / "DONE").is_file() and (out / "export" / "config.json").is_file()
    assert "sequence parallel 2: retrieval KV heads per SP rank" in proc.stdout
    rows = [m for m in metrics(out) if m["stage"] == "2-sparse_train" and "train/loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("train/loss_lm", "train/loss_distill", "train/loss_indexer_kl", "train/loss_ssa_align"):
        assert all(m[key] == m[key] and m[key] >= 0 for m in rows), key
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"]["num_kv_heads"] == 2


def test_two_rank_pipeline_pads_heads_that_sp_cannot_split(tmp_path):
    """3 KV heads at SP 2 with parallel.pad_heads: one zero KV head per layer is appended, stays exactly
    zero through training (AdamW, weight decay), and export removes it."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    heads = "{hidden_size: 384, num_attention_heads: 6, num_key_value_heads: 3, head_dim: 64}"
    proc = run(deepspeed_cmd(2, "--recipe", str(TINY), "--output-dir", str(out), "--set", f"model.overrides={heads}",
                             "--set", "parallel.sequence_parallel_size=2", "--set", "parallel.pad_heads=true"),
               timeout=900)
    assert "1 zero KV head(s) appended per layer -> 8 query / 4 KV heads" in proc.stdout
    assert (out / "DONE").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["padded_kv_heads"] == 1 and plan["model"]["num_kv_heads"] == 4
    weights = load_file(str(out / "checkpoints" / "2-sparse_train" / "final" / "model.safetensors"))
    perm = plan["kv_head_permutation"] or [[0, 1, 2, 3]] * 2
    for layer, order in enumerate(perm):
        slot, group, dim = order.index(3), 2, 64  # where the padded head (original number 3) is stored
        attn = f"model.layers.{layer}.self_attn"
        assert weights[f"{attn}.q_proj.weight"][slot * group * dim:(slot + 1) * group * dim].abs().max() == 0
        assert weights[f"{attn}.k_proj.weight"][slot * dim:(slot + 1) * dim].abs().max() == 0
        assert weights[f"{attn}.v_proj.weight"][slot * dim:(slot + 1) * dim].abs().max() == 0
        assert weights[f"{attn}.o_proj.weight"][:, slot * group * dim:(slot + 1) * group * dim].abs().max() == 0
    config = json.loads((out / "export" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (6, 3)
    assert json.loads((out / "export" / "plan.json").read_text())["padded_kv_heads"] == 0
