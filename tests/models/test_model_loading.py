"""Model loading: tiny random families, local folders, overrides, errors, the byte tokenizer."""
import pytest
import torch
from transformers import AutoTokenizer

from rtpurbo_train.errors import UserError
from rtpurbo_train.models import REGISTERED_MODELS, TINY_FAMILIES, ModelConfig, build_byte_tokenizer, load_model, resolve_dtype

FAMILY_CLASS = {"tiny-llama": "LlamaForCausalLM", "tiny-qwen2": "Qwen2ForCausalLM", "tiny-qwen3": "Qwen3ForCausalLM", "tiny-mistral": "MistralForCausalLM"}


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_tiny_family_shapes_gqa_and_forward(name):
    model, tok = load_model(ModelConfig(name_or_path=name))
    cfg = model.config
    assert type(model).__name__ == FAMILY_CLASS[name]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size) == (4, 2, 64, 256)
    assert cfg.num_hidden_layers == 2 and cfg.max_position_embeddings == 16384
    assert cfg.vocab_size == len(tok) == 259
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 64, 256)
    assert attn.k_proj.weight.shape == (2 * 64, 256) and attn.v_proj.weight.shape == (2 * 64, 256)
    # Family traits the attention integration must cope with.
    assert (attn.q_proj.bias is not None) == (name == "tiny-qwen2")
    assert hasattr(attn, "q_norm") == (name == "tiny-qwen3")
    if name == "tiny-mistral":
        assert cfg.sliding_window is None
    assert model.dtype == torch.float32  # auto on CPU
    assert tok.pad_token_id is not None and model.config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok("The quick brown fox. " * 10)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 259) and torch.isfinite(logits).all()


def test_tiny_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = load_model(ModelConfig(name_or_path="tiny-llama", seed=7))
    assert torch.equal(torch.rand(3), expected_next)
    b, _ = load_model(ModelConfig(name_or_path="tiny-llama", seed=7))
    c, _ = load_model(ModelConfig(name_or_path="tiny-llama", seed=8))
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_overrides_apply_at_construction():
    model, _ = load_model(ModelConfig(name_or_path="tiny-qwen2", overrides={"num_hidden_layers": 3, "num_key_value_heads": 1}))
    assert len(model.model.layers) == 3 and len(model.config.layer_types) == 3
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (64, 256)
    with pytest.raises(UserError, match="unknown key.*num_hiden_layers"):
        load_model(ModelConfig(name_or_path="tiny-llama", overrides={"num_hiden_layers": 3}))


def test_local_folder_roundtrip_and_dtype(tmp_path):
    model, tok = load_model(ModelConfig(name_or_path="tiny-qwen3", seed=3))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert list((tmp_path / "m").glob("*.safetensors"))
    again, tok2 = load_model(ModelConfig(name_or_path=str(tmp_path / "m")))
    ids = torch.tensor([tok("hello there, general")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2("héllo")["input_ids"] == tok("héllo")["input_ids"]
    half, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "m"), dtype="bfloat16", overrides={"num_hidden_layers": 1}))
    assert half.dtype == torch.bfloat16 and len(half.model.layers) == 1


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16


def test_user_errors_for_bad_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="model path not found: ./no/such/model"):
        load_model(ModelConfig(name_or_path="./no/such/model"))
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name_or_path="tiny-lama"))
    message = str(err.value)
    assert "not a registered name" in message and "nothing is downloaded" in message
    assert all(n in message for n in REGISTERED_MODELS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "empty")))


def test_pad_token_falls_back_to_eos(tmp_path):
    model, tok = load_model(ModelConfig(name_or_path="tiny-llama"))
    model.config.pad_token_id = None
    tok.pad_token = None
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    _, again = load_model(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert again.pad_token == again.eos_token == "<eos>"


def test_byte_tokenizer_is_bytes_and_roundtrips(tmp_path):
    tok = build_byte_tokenizer()
    text = "Ünïcode ✓ and\ttabs\nnew lines, 123"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # no specials added, id == byte value
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.pad_token == "<pad>" and len(again) == 259
