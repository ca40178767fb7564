"""Recipe files -> validated `Recipe`, with `--set key=value` overrides and short, exact errors."""
from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError
from ..paths import REPO_ROOT
from .recipe import Recipe
from .stages import STAGE_TYPES

RECIPES_DIR = REPO_ROOT / "recipes"


def recipe_path(name: str) -> Path:
    """A recipe name (a file in recipes/) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = RECIPES_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown recipe {name!r}: not a YAML file and not one of {', '.join(known)}.{hint}")


def _parse_value(text: str):
    value = yaml.safe_load(text) if text.strip() else ""
    return value


def apply_override(raw: dict, assignment: str) -> None:
    """`a.b.c=value`; a stage is addressed by index (`stages.1.lr`) or by type (`stages.sparse_train.lr`)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key=value")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_stage_index(node, part, key)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"--set {key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        raise UserError(f"--set {key}: name a field of the stage, e.g. {key}.steps=10")
    node[last] = _parse_value(text)


def _stage_index(stages: list, part: str, key: str) -> int:
    if part.isdigit():
        if int(part) >= len(stages):
            raise UserError(f"--set {key}: the recipe has {len(stages)} stages (0..{len(stages) - 1})")
        return int(part)
    matches = [i for i, s in enumerate(stages) if isinstance(s, dict) and s.get("type") == part]
    if len(matches) != 1:
        have = [s.get("type") for s in stages if isinstance(s, dict)]
        raise UserError(f"--set {key}: {'no' if not matches else 'more than one'} stage of type {part!r} "
                        f"(stages: {have}); address it by index")
    return matches[0]


def _model_at(loc: tuple, raw: dict):
    """The pydantic model class that owns the field at `loc` (for listing valid keys), or None."""
    from .stages import CalibrateStage, EvaluateStage, ExportStage, IndexerWarmupStage, SparseTrainStage

    stage_models = {"calibrate": CalibrateStage, "indexer_warmup": IndexerWarmupStage,
                    "sparse_train": SparseTrainStage, "export": ExportStage, "evaluate": EvaluateStage}
    model, parts, i = Recipe, list(loc[:-1]), 0
    while i < len(parts) and model is not None:
        part = parts[i]
        if model is Recipe and part == "stages" and i + 1 < len(parts) and isinstance(parts[i + 1], int):
            stages = raw.get("stages") or []
            stage = stages[parts[i + 1]] if parts[i + 1] < len(stages) else {}
            model = stage_models.get(stage.get("type")) if isinstance(stage, dict) else None
            i += 2
            continue
        field = model.model_fields.get(part)
        model = _first_model(field.annotation) if field is not None else None
        i += 1
    return model


def _first_model(annotation):
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _format_error(err: ValidationError, raw: dict, source: str) -> str:
    lines = []
    for e in err.errors()[:5]:
        loc = tuple(e["loc"])
        # Discriminated unions put the tag in the location (stages.1.sparse_train.lr); drop it.
        loc = tuple(p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] != "type" and p in STAGE_TYPES
                                                         and isinstance(loc[i - 1], int)))
        where = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc, raw)
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(f"unknown key {where!r}: {hint}valid keys here: {', '.join(valid)}")
        elif e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            lines.append(f"{where}: stage type must be one of {', '.join(STAGE_TYPES)}")
        else:
            lines.append(f"{where}: {e['msg']}" + (f" (got {e['input']!r})" if not isinstance(e["input"], dict) else ""))
    more = len(err.errors()) - 5
    if more > 0:
        lines.append(f"... and {more} more")
    return f"invalid recipe {source}: " + "; ".join(lines)


def validate_recipe(raw: dict, source: str = "") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_error(err, raw, source)) from None


def load_recipe(name: str, overrides: list[str] = ()) -> Recipe:
    path = recipe_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} must be a mapping of keys, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_recipe(raw, str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
