import pytest
import yaml

from rtpurbo_train.config import dump_recipe, load_recipe, recipe_path, validate_recipe
from rtpurbo_train.config.loader import RECIPES_DIR
from rtpurbo_train.errors import UserError

ALL = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", ALL)
def test_every_shipped_recipe_validates_and_round_trips(name):
    recipe = load_recipe(name)
    again = validate_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_required_recipes_exist():
    assert {"quickstart", "rtpurbo_300step", "calibrate", "indexer_warmup", "ssa_align"} <= set(ALL)
    r = load_recipe("rtpurbo_300step")
    assert [s.type for s in r.stages] == ["calibrate", "indexer_warmup", "sparse_train", "export", "evaluate"]
    assert r.stages[2].steps == 300


def test_unknown_key_names_the_key_and_the_valid_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - type: indexer_warmup\n    steps: 3\n    seq_len: 64\n    lrr: 0.1\n")
    with pytest.raises(UserError) as err:
        load_recipe(str(path))
    msg = str(err.value)
    assert "'stages.0.lrr'" in msg and "did you mean 'lr'" in msg and "warmup_steps" in msg


def test_unknown_top_level_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sparsty: {}\nstages: [{type: export}]\n")
    with pytest.raises(UserError, match="unknown key 'sparsty'.*did you mean 'sparsity'"):
        load_recipe(str(path))


@pytest.mark.parametrize("override,fragment", [
    ("sparsity.top_p=1.5", "sparsity.top_p"),
    ("sparsity.window=0", "sparsity.window"),
    ("stages.sparse_train.steps=0", "stages.2.steps"),
    ("stages.1.warmup_steps=500", "warmup_steps"),
    ("stages.2.losses.ssa_align=1.0", "mode: both"),
])
def test_values_are_range_checked(override, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        load_recipe("quickstart", [override])


def test_set_converts_types_and_addresses_stages_by_type_or_index():
    r = load_recipe("quickstart", ["stages.sparse_train.steps=3", "stages.1.lr=5e-4", "sparsity.top_k=8",
                                   "deepspeed.activation_checkpointing=true", "model.name_or_path=tiny-llama"])
    assert r.stages[2].steps == 3 and r.stages[1].lr == 5e-4 and r.sparsity.top_k == 8
    assert r.deepspeed.activation_checkpointing is True and r.model.name_or_path == "tiny-llama"


@pytest.mark.parametrize("override,fragment", [
    ("stages.nope.steps=3", "no stage of type 'nope'"),
    ("stages.9.steps=3", "has 5 stages"),
    ("novalue", "expected key=value"),
])
def test_bad_overrides(override, fragment):
    with pytest.raises(UserError, match=fragment):
        load_recipe("quickstart", [override])


def test_unknown_recipe_suggests_a_close_name():
    with pytest.raises(UserError, match="did you mean 'quickstart'"):
        recipe_path("quickstrt")


def _plan_settings(recipe):
    from types import SimpleNamespace

    from rtpurbo_train.pipeline.context import RunContext
    return RunContext.plan_settings(SimpleNamespace(recipe=recipe))


def test_query_stride_auto_follows_the_training_length():
    # The default conversion (8K) keeps the exact selection; a long-context recipe gets the strided one.
    assert load_recipe("rtpurbo_300step").sparsity.query_stride == "auto"
    assert _plan_settings(load_recipe("rtpurbo_300step"))["query_stride"] == 1
    long = load_recipe("rtpurbo_300step", ["stages.sparse_train.seq_len=65536"])
    assert _plan_settings(long)["query_stride"] == 8
    fixed = load_recipe("rtpurbo_300step", ["sparsity.query_stride=4"])
    assert _plan_settings(fixed)["query_stride"] == 4


def test_plan_rejects_a_query_stride_the_kernel_cannot_take():
    from rtpurbo_train.plan import HeadLayout, SparsityPlan
    layout = HeadLayout(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64)
    for bad in (3, 128):
        with pytest.raises(ValueError, match="query_stride"):
            SparsityPlan.uniform(layout, [1], query_stride=bad)
    assert SparsityPlan.uniform(layout, [1], query_stride=16).query_stride == 16


def test_kl_query_block_stride_auto_and_explicit():
    r = load_recipe("rtpurbo_300step")
    assert r.stages[1].kl_query_block_stride == "auto" and r.stages[1].kl_stride() == 1  # 8K: every block
    r = load_recipe("rtpurbo_300step", ["stages.indexer_warmup.seq_len=65536", "stages.sparse_train.kl_query_block_stride=3"])
    assert r.stages[1].kl_stride() == 8 and r.stages[2].kl_stride() == 3
    with pytest.raises(UserError, match="kl_query_block_stride"):
        load_recipe("rtpurbo_300step", ["stages.sparse_train.kl_query_block_stride=0"])


def test_retrieval_window_auto_is_the_streaming_window_and_becomes_local_blocks():
    from rtpurbo_train.export.hf_config import rtpurbo_section
    from rtpurbo_train.plan import HeadLayout, SparsityPlan

    assert _plan_settings(load_recipe("rtpurbo_300step"))["retrieval_window"] == 1024
    assert _plan_settings(load_recipe("rtpurbo_300step", ["sparsity.retrieval_window=0"]))["retrieval_window"] == 0
    layout = HeadLayout(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64)
    plan = SparsityPlan.uniform(layout, [1], window=1024, retrieval_window=1024, block_size=64)
    assert plan.retrieval_local_blocks == 17  # the query's block and the 16 before it hold its 1024 keys
    assert rtpurbo_section(plan)["local_blocks"] == 17
    # a plan file from before the setting: no window, the own and the previous block
    old = SparsityPlan.model_validate({k: v for k, v in plan.model_dump().items() if k != "retrieval_window"})
    assert old.retrieval_window == 0 and old.retrieval_local_blocks == 2


@pytest.mark.parametrize("block_size", [16, 64])
def test_window_blocks_cover_exactly_the_blocks_a_window_reaches(block_size):
    # Brute force: key block kb is needed by query block qb when some query m of qb sees some key n of kb
    # through the window (n <= m, m - n < W).
    from rtpurbo_train.plan import window_blocks

    qb = 6
    queries = range(qb * block_size, (qb + 1) * block_size)
    for window in (1, 2, block_size - 1, block_size, block_size + 1, 3 * block_size, 3 * block_size + 5):
        needed = {n // block_size for m in queries for n in range(m + 1) if m - n < window}
        assert needed == set(range(qb - window_blocks(window, block_size) + 1, qb + 1)), window
    assert window_blocks(0, block_size) == 0
