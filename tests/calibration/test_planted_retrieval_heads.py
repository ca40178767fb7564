"""Calibration finds retrieval heads planted in tiny models (see calibration_models.plant_heads)."""
import pytest
import torch

from calibration_models import FAMILIES, kv_pairs_ranked, plant_heads, planted_stand_out, tiny_model
from rtpurbo_train.calibration import calibrate, make_echo_documents
from rtpurbo_train.plan import SparsityPlan

# 4 layers x 4 KV heads (8 query heads, group 2) = 16 KV heads; the default fraction 0.15 keeps 2.
SHAPE = dict(num_layers=4, num_q_heads=8, num_kv_heads=4)
GROUP = 2
RETRIEVAL_Q = [(1, 4), (3, 1)]            # (layer, query head)
RETRIEVAL_KV = {(1, 2), (3, 0)}           # their (layer, KV head)
LOCAL_Q = [(0, 0), (2, 6)]


@pytest.fixture(scope="module")
def documents():
    # Needle ids outside the haystack's id range, so a copy head's only matches are the two copies.
    hay = torch.randint(0, 200, (2000,), generator=torch.Generator().manual_seed(0))
    return make_echo_documents(hay, lengths=[256, 512], docs_per_length=2, needle_len=32,
                               needle_id_range=(200, 300), seed=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_planted_heads_ranked_on_top_and_selected(family, documents, tmp_path):
    model = plant_heads(tiny_model(family, **SHAPE), retrieval=RETRIEVAL_Q, local=LOCAL_Q)
    plan, q_scores = calibrate(model, documents, plan_settings={"window": 128, "sink_tokens": 4}, progress=False)

    assert q_scores.shape == (4, 8)
    assert set(kv_pairs_ranked(q_scores, GROUP)[:2]) == RETRIEVAL_KV
    assert planted_stand_out(q_scores, GROUP, RETRIEVAL_KV)
    # a copy head splits its mass between the needle_1 copy and the token itself: about 1/2
    for layer, head in RETRIEVAL_Q:
        assert 0.4 < q_scores[layer, head] < 0.6
    # local heads look at the query token itself, never 200+ tokens back
    for layer, head in LOCAL_Q:
        assert q_scores[layer, head] < 0.05

    assert plan.retrieval_fraction == 0.15 and plan.window == 128 and plan.sink_tokens == 4
    assert plan.num_retrieval_kv_heads() == round(0.15 * 16) == 2
    assert {(i, h) for i in range(4) for h in plan.retrieval_kv_heads(i)} == RETRIEVAL_KV
    plan.save(tmp_path / "plan.json")
    assert SparsityPlan.load(tmp_path / "plan.json") == plan


def test_random_model_has_no_standout_heads(documents):
    """The check above is not vacuous: an unplanted model of the same shape fails it."""
    model = tiny_model("llama", **SHAPE)
    _, q_scores = calibrate(model, documents, progress=False)
    assert not planted_stand_out(q_scores, GROUP, RETRIEVAL_KV)
    # near-uniform attention: needle_1 holds about needle_len / position of the mass everywhere
    assert q_scores.max() < 0.2


def test_larger_fraction_keeps_planted_heads_and_more(documents):
    model = plant_heads(tiny_model("llama", **SHAPE), retrieval=RETRIEVAL_Q, local=LOCAL_Q)
    plan, q_scores = calibrate(model, documents, fraction=0.25, progress=False)
    chosen = {(i, h) for i in range(4) for h in plan.retrieval_kv_heads(i)}
    assert len(chosen) == 4 and RETRIEVAL_KV <= chosen
    # the extra two are the best of the rest
    assert chosen - RETRIEVAL_KV == set(kv_pairs_ranked(q_scores, GROUP)[2:4])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kv_head_chosen_when_one_query_head_of_its_group_retrieves(family, documents):
    # Plant only the SECOND query head (5) of KV head 2 in layer 2; query head 4 stays diffuse.
    model = plant_heads(tiny_model(family, **SHAPE), retrieval=[(2, 5)])
    plan, q_scores = calibrate(model, documents, fraction=1 / 16, progress=False)
    assert q_scores[2, 5] > 0.4 and q_scores[2, 4] < 0.2
    assert [plan.retrieval_kv_heads(i) for i in range(4)] == [[], [], [2], []]
    assert plan.retrieval_q_heads(2) == [4, 5]          # the whole group becomes retrieval
    assert plan.layers[2].kv_scores[2] == pytest.approx(float(q_scores[2, 5]))
    assert plan.headwise_flags()[2] == [0, 0, 0, 0, 1, 1, 0, 0]
