"""Captured needle-echo scores against full eager attention matrices, and model-state hygiene."""
import pytest
import torch

from calibration_models import tiny_model
from rtpurbo_train.calibration import (CALIBRATION_ATTN, NeedleEchoProbe, calibrate, make_echo_documents,
                                       measure_retrieval_scores, needle_echo_attention,
                                       register_calibration_attention)

FAMILY_CONFIGS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    # a window shorter than the needle distance, so only part of needle_1 is visible: checks that the
    # function honours the model's own mask (sliding window) and not plain causal attention
    "mistral": {"sliding_window": 80},
}


def _docs():
    hay = torch.randint(0, 300, (500,), generator=torch.Generator().manual_seed(0))
    return make_echo_documents(hay, lengths=[64, 96], docs_per_length=2, needle_len=8, seed=1)


def _reference_scores(model, docs):
    """[L, Hq] from eager `output_attentions` on the full documents (per length, then over lengths)."""
    model.set_attn_implementation("eager")
    per_length = {}
    with torch.no_grad():
        for doc in docs:
            out = model(input_ids=doc.input_ids[None], output_attentions=True)
            (s1, e1), (s2, e2) = doc.needle_1, doc.needle_2
            rows = torch.stack([a[0, :, s2:e2, s1:e1].sum(-1).mean(-1) for a in out.attentions])  # [L, Hq]
            per_length.setdefault(doc.length, []).append(rows.double())
    model.set_attn_implementation("sdpa")
    return torch.stack([torch.stack(v).mean(0) for _, v in sorted(per_length.items())]).mean(0)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_scores_match_eager_attention_matrices(family):
    model = tiny_model(family, num_layers=2, num_q_heads=4, num_kv_heads=2, **FAMILY_CONFIGS[family])
    # Sharpen attention so scores differ clearly between heads (random init is near uniform).
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(8.0)
            attn.k_proj.weight.mul_(8.0)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises q/k per head, which undoes the scaling
                attn.q_norm.weight.fill_(2.5)
                attn.k_norm.weight.fill_(2.5)
    docs = _docs()
    got = measure_retrieval_scores(model, docs, progress=False)
    want = _reference_scores(model, docs)
    assert got.shape == (2, 4)
    assert want.min() > 1e-3, "reference too small for a meaningful comparison"
    assert want.max() - want.min() > 0.05, "reference does not separate heads"
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_calibration_attention_keeps_model_outputs(family):
    model = tiny_model(family)
    doc = _docs()[-1]
    with torch.no_grad():
        want = model(input_ids=doc.input_ids[None]).logits
        probe = NeedleEchoProbe(2, 4)
        with needle_echo_attention(model, probe):
            probe.start_document(doc.needle_1, doc.needle_2)
            assert model.config._attn_implementation == CALIBRATION_ATTN
            got = model(input_ids=doc.input_ids[None]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("start_impl", ["sdpa", "eager"])
def test_attention_implementation_and_mode_restored(start_impl):
    model = tiny_model("llama", attn_implementation=start_impl)
    model.train()
    calibrate(model, _docs(), fraction=0.5, progress=True)
    assert model.config._attn_implementation == start_impl
    assert model.training


def test_restored_after_error():
    model = tiny_model("llama")
    bad = make_echo_documents(torch.arange(1000, 1400), lengths=[64], docs_per_length=1, needle_len=8)  # ids >= vocab
    with pytest.raises(IndexError):
        measure_retrieval_scores(model, bad, progress=False)
    assert model.config._attn_implementation == "sdpa"
    assert not model.training


def test_function_refuses_to_run_outside_calibration():
    register_calibration_attention()
    model = tiny_model("llama", attn_implementation=CALIBRATION_ATTN)
    with pytest.raises(RuntimeError, match="only usable inside"):
        model(input_ids=torch.arange(10)[None])


def test_bad_plan_settings_and_fraction():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="retrieval_fraction"):
        calibrate(model, _docs(), plan_settings={"retrieval_fraction": 0.2}, progress=False)
    with pytest.raises(ValueError, match="fraction"):
        calibrate(model, _docs(), fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="no calibration documents"):
        measure_retrieval_scores(model, [], progress=False)
