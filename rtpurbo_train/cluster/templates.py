"""Cluster job templates: find them, read their declared parameters, fill `{{name}}` placeholders.

A template is a plain file in `launch/cluster/` (Slurm scripts, Kubernetes manifests). Its header
declares every placeholder it uses, one comment line each, in the form

    # @param NAME | TYPE | DEFAULT | description

TYPE is `int` (a positive integer), `word` (one shell/YAML-safe token: letters, digits and
`._/@:+,=-`), `args` (one line of command-line arguments without `"`, `\\` or backquotes, so it fits
inside a double-quoted shell or YAML string) or `text` (any single line, inserted verbatim). DEFAULT
is `required` (the caller must give a value) or the literal default; `""` means the empty string.

Placeholders are `{{NAME}}` (spaces inside the braces are allowed); an `int` parameter also takes a
constant offset, `{{NAME - 1}}` or `{{NAME + 1}}` (a PyTorchJob's worker count is the node count
minus its master). Rendering refuses missing required values, unknown names and values of the wrong
type, and names them all in one error, so a typo never yields a half-filled job.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:([-+])\s*([0-9]+)\s*)?\}\}")
PARAM_LINE = re.compile(r"^#\s*@param\s+(.*)$")
WORD_VALUE = re.compile(r"^[A-Za-z0-9._/@:+,=-]+$")
TYPES = ("int", "word", "args", "text")
TEMPLATE_DIR_ENV = "RTPURBO_CLUSTER_TEMPLATES"


class TemplateError(ValueError):
    """A template is unknown, malformed, or was given missing/unknown/ill-typed values."""


@dataclasses.dataclass(frozen=True)
class TemplateParam:
    name: str
    type: str
    default: str | None  # None: required
    description: str

    @property
    def required(self) -> bool:
        return self.default is None


def template_dir() -> Path:
    """`launch/cluster/` of the repository (or `$RTPURBO_CLUSTER_TEMPLATES` when set).

    The templates are files users copy and edit, so they live beside `launch/train.py`, not inside
    the package; an editable install (the documented set-up) finds them from the package path.
    """
    override = os.environ.get(TEMPLATE_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "launch" / "cluster"


def list_templates() -> list[str]:
    """Names (file stem) of the templates: files in `template_dir()` that declare `@param` lines."""
    root = template_dir()
    if not root.is_dir():
        raise TemplateError(f"template folder {root} does not exist (set {TEMPLATE_DIR_ENV})")
    names = []
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix in (".sh", ".yaml", ".yml"):
            if any(PARAM_LINE.match(line) for line in path.read_text().splitlines()):
                names.append(path.stem)
    return names


def template_path(name: str) -> Path:
    """Path of template `name` (file stem, or file name with its extension)."""
    root = template_dir()
    for candidate in (root / name, *(root / f"{name}{ext}" for ext in (".sh", ".yaml", ".yml"))):
        if candidate.is_file():
            return candidate
    raise TemplateError(f"unknown template {name!r}; available: {', '.join(list_templates())}")


def parse_params(text: str, source: str = "<template>") -> dict[str, TemplateParam]:
    """The `@param` declarations of a template text, in order of appearance."""
    params: dict[str, TemplateParam] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        match = PARAM_LINE.match(line.strip())
        if not match:
            continue
        fields = [f.strip() for f in match.group(1).split("|", 3)]
        if len(fields) != 4:
            raise TemplateError(f"{source}:{lineno}: expected '@param NAME | TYPE | DEFAULT | text'")
        name, type_, default, description = fields
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or type_ not in TYPES:
            raise TemplateError(f"{source}:{lineno}: bad name {name!r} or type {type_!r} (types: {TYPES})")
        if name in params:
            raise TemplateError(f"{source}:{lineno}: parameter {name!r} declared twice")
        value = None if default == "required" else ("" if default == '""' else default)
        param = TemplateParam(name, type_, value, description)
        if value is not None and _type_problem(param, value):
            raise TemplateError(f"{source}:{lineno}: default of {name!r}: {_type_problem(param, value)}")
        params[name] = param
    return params


def template_params(name: str) -> dict[str, TemplateParam]:
    path = template_path(name)
    return parse_params(path.read_text(), str(path))


def _type_problem(param: TemplateParam, value: str) -> str | None:
    if "\n" in value or "\r" in value:
        return "must be a single line"
    if "{{" in value or "}}" in value:
        return "must not contain '{{' or '}}'"
    if param.type == "int" and not re.fullmatch(r"[1-9][0-9]*", value):
        return f"expected a positive integer, got {value!r}"
    if param.type == "word" and not WORD_VALUE.match(value):
        return f"expected one word of letters, digits and ._/@:+,=- (no spaces or quotes), got {value!r}"
    if param.type == "args" and any(c in value for c in '"\\`'):
        return f"must not contain double quotes, backslashes or backquotes, got {value!r}"
    return None


def render_text(text: str, values: dict, source: str = "<template>") -> str:
    """Fill the placeholders of a template text; see the module docstring for the rules."""
    params = parse_params(text, source)
    uses = PLACEHOLDER.findall(text)
    undeclared = sorted({name for name, _, _ in uses} - set(params))
    if undeclared:
        raise TemplateError(f"{source} uses undeclared placeholders: {', '.join(undeclared)}")
    not_int = sorted({name for name, op, _ in uses if op and params[name].type != "int"})
    if not_int:
        raise TemplateError(f"{source}: offsets are only allowed on int parameters: {', '.join(not_int)}")
    given = {str(k): ("" if v is None else str(v)) for k, v in values.items()}
    problems = []
    missing = [p for p in params.values() if p.required and p.name not in given]
    if missing:
        problems.append("missing values: " + "; ".join(f"{p.name} ({p.description})" for p in missing))
    unknown = sorted(set(given) - set(params))
    if unknown:
        problems.append(f"unknown names: {', '.join(unknown)} (this template takes: {', '.join(params)})")
    for key, value in given.items():
        if key in params and (problem := _type_problem(params[key], value)):
            problems.append(f"{key}: {problem}")
    if problems:
        raise TemplateError(f"cannot render {source}: " + " | ".join(problems))
    filled = {name: given.get(name, param.default) for name, param in params.items()}
    for name, op, offset in uses:
        if op == "-" and int(filled[name]) - int(offset) < 0:
            problems.append(f"{name}={filled[name]} is too small: the template uses {name} - {offset}")
    if problems:
        raise TemplateError(f"cannot render {source}: " + " | ".join(problems))

    def substitute(match: re.Match) -> str:
        name, op, offset = match.groups()
        if not op:
            return filled[name]
        return str(int(filled[name]) + (int(offset) if op == "+" else -int(offset)))

    return PLACEHOLDER.sub(substitute, text)


def render_template(name: str, values: dict) -> str:
    """The text of template `name` (a file stem in `launch/cluster/`) with `{{...}}` filled.

    `values` maps parameter names to values (converted with `str`); declared defaults fill the rest.
    Raises `TemplateError` naming every missing required value, every unknown name and every value
    of the wrong type.
    """
    path = template_path(name)
    return render_text(path.read_text(), values, path.name)
