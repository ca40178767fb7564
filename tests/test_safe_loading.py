"""Safe loading: the package reads weights only through safetensors or torch.load(weights_only=True),
and passes trust_remote_code to transformers only when the recipe asks for it."""
import ast
from pathlib import Path

import pytest

from rtpurbo_train.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "rtpurbo_train").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def _calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            full = f"{getattr(f.value, 'id', '')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if full == name:
                yield node


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_torch_load_is_weights_only(path):
    tree = ast.parse(path.read_text())
    for call in _calls(tree, "torch.load"):
        kw = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
            f"{path}:{call.lineno}: torch.load without weights_only=True"
    assert not list(_calls(tree, "pickle.load")), f"{path}: pickle.load"


def test_remote_code_is_off_unless_the_recipe_says_so(tmp_path, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    from rtpurbo_train.models import load_model
    model, tok = load_model(ModelConfig(name_or_path="tiny-llama"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    load_model(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert seen and not any(seen)
