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
