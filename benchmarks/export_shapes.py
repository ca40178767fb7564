"""Model shapes and export folders shared by the export benchmarks (bench_decode.py, bench_prefill.py).

`SHAPES`: random-weight models with the shape of Qwen2-1.5B or SmolLM2-135M; `add_shape_arguments` /
`apply_shape_defaults`: the `--layers/--hidden/...` overrides of a shape (e.g. a tiny CPU smoke run);
`build_and_export`: a random-weight model of a shape + a plan -> an export folder; `export_pretrained`: the
same for real weights (`rtpurbo_train.models.load_model`). The plan (`random_plan`) keeps the top 15% of KV
heads by seeded random scores (speed does not depend on which), sink 4, top-p 0.9; the indexer is the
random init of `attach_sparsity` (seed 0).
"""
from __future__ import annotations

import dataclasses

import torch

# Each shape: the config class and its fields (None: the byte tokenizer's vocabulary), window and prompt.
SHAPES = {
    "qwen2-1.5b": dict(config="Qwen2Config", hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2,
                       head_dim=128, vocab=None, rope_theta=None, tied=False, window=8192, prompt=32768),
    "smollm2-135m": dict(config="LlamaConfig", hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3,
                         head_dim=64, vocab=49152, rope_theta=100000.0, tied=True, window=1024, prompt=8192),
}
LABELS = {"qwen2-1.5b": "Qwen2-1.5B", "smollm2-135m": "SmolLM2-135M"}
SHAPE_FIELDS = ("layers", "hidden", "intermediate", "heads", "kv-heads", "head-dim")
RETRIEVAL_FRACTION = 0.15
TOP_P = 0.9


def add_shape_arguments(parser) -> None:
    """`--layers --hidden --intermediate --heads --kv-heads --head-dim`: override one field of the shape."""
    for name in SHAPE_FIELDS:
        parser.add_argument(f"--{name}", type=int, default=None, help="override the shape's value")


def apply_shape_defaults(args) -> None:
    """Fill every option of `args` that is None (and is a field of the shape, e.g. window) from SHAPES[args.shape]."""
    for name, value in SHAPES[args.shape].items():
        if getattr(args, name, 0) is None:
            setattr(args, name, value)


def model_config(args, tok, max_len: int):
    """The transformers config of `args.shape` with the overrides in `args`, for sequences up to `max_len`."""
    import transformers

    shape = SHAPES[args.shape]
    extra = {} if shape["rope_theta"] is None else {"rope_theta": shape["rope_theta"]}
    return getattr(transformers, shape["config"])(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        vocab_size=shape["vocab"] or len(tok), max_position_embeddings=max_len + 64,
        tie_word_embeddings=shape["tied"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **extra)


def random_plan(config, window: int, seqlen_threshold: int = 0):
    """The top 15% of KV heads by seeded random scores; window `window` (streaming heads, and the retrieval
    heads' own window as in the recipes), sink 4, top-p 0.9, block 64."""
    from rtpurbo_train.plan import HeadLayout, SparsityPlan

    layout = HeadLayout.from_config(config)
    scores = torch.rand(layout.num_layers, layout.num_q_heads, generator=torch.Generator().manual_seed(0)).tolist()
    return SparsityPlan.from_scores(layout, scores, RETRIEVAL_FRACTION, window=window, retrieval_window=window,
                                    top_p=TOP_P, sink_tokens=4, seqlen_threshold=seqlen_threshold)


def _attach_and_export(model, tok, folder, window: int, seqlen_threshold: int):
    from rtpurbo_train.attention import attach_sparsity
    from rtpurbo_train.export import export_model

    plan = random_plan(model.config, window, seqlen_threshold)
    attach_sparsity(model, plan, backend="reference")
    export_model(model, tok, plan, folder, dtype="bfloat16")
    return plan


def build_and_export(folder, args, max_len: int, seqlen_threshold: int = 0):
    """A float32 random-weight model of `args.shape` (seed 0) with the random plan, exported (bf16) to
    `folder`; returns the plan. `max_len`: the longest sequence it will see (tokenizer, positions)."""
    from transformers import AutoModelForCausalLM

    from rtpurbo_train.models import build_byte_tokenizer

    tok = build_byte_tokenizer(model_max_length=max_len + 8)
    cfg = model_config(args, tok, max_len)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return _attach_and_export(model, tok, folder, args.window, seqlen_threshold)


def export_pretrained(folder, name: str, window: int, seqlen_threshold: int = 0):
    """The real model `name` (anything `rtpurbo_train.models.load_model` loads, e.g. smollm2-135m; float32
    on CPU) with the random plan and a random-init indexer, exported (bf16) to `folder`; returns the plan."""
    from rtpurbo_train.models import ModelConfig, load_model

    model, tok = load_model(ModelConfig(name_or_path=name, dtype="float32"))
    return _attach_and_export(model, tok, folder, window, seqlen_threshold)


def set_threshold(model, threshold: int) -> None:
    """seqlen_threshold of a trust_remote_code model: the frozen settings replaced on the model and every layer."""
    settings = dataclasses.replace(model.rtpurbo_settings, seqlen_threshold=int(threshold))
    model.rtpurbo_settings = settings
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "rtpurbo_settings"):
            layer.self_attn.rtpurbo_settings = settings
