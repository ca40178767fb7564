"""Tiny random decoder models for calibration tests, and a builder that plants retrieval heads.

Planted retrieval head (layer i, query head h): q_h and k_{h // G} are the same projection P of the
token's embedding, P living only on the lowest-frequency rotary dims. With rope_theta = 1e8 those
dims rotate by < 0.05 rad over the test lengths, so q_t . k_j is large whenever token j has token t's
id, at any distance: the second needle copy attends to the first (and to itself). Local heads use
the same trick on the highest-frequency dims, where the rotation kills every match except the query
token itself. All other heads keep their random (diffuse) weights. MLPs are zeroed so the residual
stream stays close to the token embedding in every layer (o_proj is scaled down for the same reason), which keeps planted heads working deep in.
"""
from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
HEAD_DIM = 64
HALF = HEAD_DIM // 2
# Rotary pair i pairs dim i with dim i + HALF; frequency theta^(-2i/HEAD_DIM) falls with i.
LOW_FREQ_DIMS = list(range(HALF // 2, HALF)) + list(range(HALF + HALF // 2, HEAD_DIM))  # 32 dims
HIGH_FREQ_DIMS = list(range(0, 8)) + list(range(HALF, HALF + 8))                          # 16 dims


def tiny_model(family: str, *, num_layers=2, num_q_heads=4, num_kv_heads=2, hidden=128, vocab=300,
               seed=0, attn_implementation="sdpa", **config_overrides):
    """A randomly initialised tiny model of `family`, in eval mode, float32."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=num_layers, num_attention_heads=num_q_heads,
                        num_key_value_heads=num_kv_heads, head_dim=HEAD_DIM, rope_theta=1e8,
                        max_position_embeddings=4096, tie_word_embeddings=False, **config_overrides)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def _projection(dims: list[int], hidden: int, gain: float, gen: torch.Generator) -> torch.Tensor:
    """[HEAD_DIM, hidden]: gain * orthonormal rows on `dims`, zero elsewhere."""
    rows, _ = torch.linalg.qr(torch.randn(hidden, len(dims), generator=gen))
    proj = torch.zeros(HEAD_DIM, hidden)
    proj[dims] = gain * rows.T
    return proj


@torch.no_grad()
def plant_heads(model, *, retrieval: list[tuple[int, int]], local: list[tuple[int, int]] = (), seed=1,
                gain=3.0, norm_gain=2.0):
    """Make query heads `retrieval` [(layer, q_head)] copy heads and `local` [(layer, q_head)] self heads.

    Each planted query head's KV head gets the same projection, so two planted query heads must not
    share a KV head. Returns the model.
    """
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    gen = torch.Generator().manual_seed(seed)
    model.model.embed_tokens.weight.normal_(0.0, 1.0, generator=gen)
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.zero_()
        layer.self_attn.o_proj.weight.mul_(0.1)
    used_kv = set()
    for heads, dims in ((retrieval, LOW_FREQ_DIMS), (local, HIGH_FREQ_DIMS)):
        for layer_idx, q_head in heads:
            kv_head = q_head // group
            if (layer_idx, kv_head) in used_kv:
                raise ValueError(f"KV head {kv_head} of layer {layer_idx} is planted twice")
            used_kv.add((layer_idx, kv_head))
            attn = model.model.layers[layer_idx].self_attn
            proj = _projection(dims, config.hidden_size, gain, gen)
            attn.q_proj.weight[q_head * HEAD_DIM:(q_head + 1) * HEAD_DIM] = proj
            attn.k_proj.weight[kv_head * HEAD_DIM:(kv_head + 1) * HEAD_DIM] = proj
            for lin, h in ((attn.q_proj, q_head), (attn.k_proj, kv_head)):
                if lin.bias is not None:
                    lin.bias[h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0.0
            if hasattr(attn, "q_norm"):
                # Qwen3 RMS-normalises q and k per head before RoPE, which removes the gain; put it
                # back through the norm weights (shared by the layer's heads, so all heads sharpen).
                attn.q_norm.weight.fill_(norm_gain)
                attn.k_norm.weight.fill_(norm_gain)
    return model


def kv_pairs_ranked(q_scores: torch.Tensor, group: int) -> list[tuple[int, int]]:
    """(layer, kv_head) pairs by descending KV score (max over the group's query heads)."""
    kv = q_scores.view(q_scores.shape[0], -1, group).amax(-1)
    order = torch.argsort(kv.flatten(), descending=True)
    return [(int(i) // kv.shape[1], int(i) % kv.shape[1]) for i in order]


def planted_stand_out(q_scores: torch.Tensor, group: int, planted_kv: set[tuple[int, int]],
                      *, margin: float = 3.0, floor: float = 0.3) -> bool:
    """True when every planted KV head scores above `floor` and above `margin` x every other KV head."""
    kv = q_scores.view(q_scores.shape[0], -1, group).amax(-1)
    planted = torch.tensor([kv[i, h] for i, h in planted_kv])
    others = torch.tensor([kv[i, h] for i in range(kv.shape[0]) for h in range(kv.shape[1])
                           if (i, h) not in planted_kv])
    return bool(planted.min() > floor and planted.min() > margin * others.max())
