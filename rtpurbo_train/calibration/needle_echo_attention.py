"""The calibration attention function: SDPA output, plus needle_2 -> needle_1 attention mass.

Registered in transformers' `ALL_ATTENTION_FUNCTIONS` as "rtpurbo_calibrate". The layer output is
transformers' own SDPA path (so the forward is the model's normal forward); in addition, only the
needle_2 query rows of the softmax are computed explicitly (`[Hq, n2, T]`, never `[T, T]`) and
their mass on needle_1 keys is recorded per (layer, query head) in the active `NeedleEchoProbe`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CALIBRATION_ATTN = "rtpurbo_calibrate"

# Upper bound on the elements of one explicit logits chunk [heads, n2, T] (float32): 2**26 = 256 MiB.
_MAX_CHUNK_ELEMENTS = 1 << 26

_active_probe: Optional["NeedleEchoProbe"] = None


class NeedleEchoProbe:
    """Collects R_h = mean_{t in needle_2} sum_{j in needle_1} A_h(t, j) for one document.

    `mass[layer, q_head]` (float64 [L, Hq]) is filled by the attention function during one forward.
    """

    def __init__(self, num_layers: int, num_q_heads: int):
        self.num_layers = num_layers
        self.num_q_heads = num_q_heads
        self.needle_1: Optional[tuple[int, int]] = None
        self.needle_2: Optional[tuple[int, int]] = None
        self.mass = torch.zeros(num_layers, num_q_heads, dtype=torch.float64)
        self.seen = torch.zeros(num_layers, dtype=torch.bool)

    def start_document(self, needle_1: tuple[int, int], needle_2: tuple[int, int]) -> None:
        self.needle_1, self.needle_2 = needle_1, needle_2
        self.mass.zero_()
        self.seen.zero_()

    def document_scores(self) -> torch.Tensor:
        """float64 [L, Hq]; raises if some layer never went through the calibration function."""
        if not bool(self.seen.all()):
            missing = [i for i in range(self.num_layers) if not self.seen[i]]
            raise RuntimeError(
                f"layers {missing} never called the '{CALIBRATION_ATTN}' attention function; the model must "
                "dispatch attention through transformers' ALL_ATTENTION_FUNCTIONS (config._attn_implementation)")
        return self.mass.clone()

    @torch.no_grad()
    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
               attention_mask: Optional[torch.Tensor], scaling: Optional[float]) -> None:
        """query [1, Hq, T, D], key [1, Hkv, T, D] (post-RoPE, as the attention function gets them);
        attention_mask None (plain causal) or [1, 1|Hq, T, T] bool (True = visible) / additive float."""
        if self.needle_1 is None:
            raise RuntimeError("NeedleEchoProbe.record called before start_document")
        b, hq, tq, d = query.shape
        hkv, tk = key.shape[1], key.shape[2]
        if b != 1:
            raise ValueError(f"calibration runs one document at a time (batch 1), got batch {b}")
        if tq != tk:
            raise ValueError(f"calibration needs query length == key length (no KV cache), got {tq} vs {tk}")
        if hq != self.num_q_heads or not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer {layer_idx} with {hq} query heads does not fit a probe for "
                             f"{self.num_layers} layers x {self.num_q_heads} heads")
        (s1, e1), (s2, e2) = self.needle_1, self.needle_2
        if e2 > tq:
            raise ValueError(f"needle_2 {self.needle_2} runs past the sequence length {tq}")
        scale = d ** -0.5 if scaling is None else scaling
        group = hq // hkv
        n2 = e2 - s2

        rows = torch.arange(s2, e2, device=query.device)
        if attention_mask is None:
            # transformers passes no mask when plain causal attention is exact (SDPA is_causal).
            visible = torch.arange(tk, device=query.device)[None, :] <= rows[:, None]   # [n2, T]
            bias = torch.zeros(n2, tk, device=query.device).masked_fill_(~visible, float("-inf"))[None]
        elif attention_mask.dtype == torch.bool:
            m = attention_mask[0, :, s2:e2, :tk]                                            # [1|Hq, n2, T]
            bias = torch.zeros(m.shape, device=query.device).masked_fill_(~m, float("-inf"))
        else:
            bias = attention_mask[0, :, s2:e2, :tk].float()

        q_rows = query[0, :, s2:e2].float().reshape(hkv, group, n2, d)                      # [Hkv, G, n2, D]
        k_all = key[0].float()                                                              # [Hkv, T, D]
        per_chunk = max(1, _MAX_CHUNK_ELEMENTS // (group * n2 * tk))
        out = torch.empty(hq, dtype=torch.float64)
        for h0 in range(0, hkv, per_chunk):
            h1 = min(hkv, h0 + per_chunk)
            # GQA: the G query heads of KV head h all score against key head h.
            logits = torch.einsum("hgnd,htd->hgnt", q_rows[h0:h1], k_all[h0:h1]) * scale
            logits = logits.reshape((h1 - h0) * group, n2, tk)                              # [heads, n2, T]
            b_chunk = bias if bias.shape[0] == 1 else bias[h0 * group:h1 * group]
            probs = torch.softmax(logits + b_chunk, dim=-1)
            out[h0 * group:h1 * group] = probs[:, :, s1:e1].sum(-1).mean(-1).double().cpu()
        self.mass[layer_idx] = out
        self.seen[layer_idx] = True


def needle_echo_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, **kwargs):
    """transformers attention function: returns (attn_output [B, T, Hq, D], None) like "sdpa"."""
    probe = _active_probe
    if probe is None:
        raise RuntimeError(f"the '{CALIBRATION_ATTN}' attention function is only usable inside "
                           "rtpurbo_train.calibration.needle_echo_attention(...)")
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"calibration does not support attention with '{name}'")
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                       scaling=scaling, is_causal=is_causal, **kwargs)
    probe.record(module.layer_idx, query, key, attention_mask, scaling)
    return output, None


def register_calibration_attention() -> None:
    """Register the function and its mask builder (the SDPA one, so sliding-window models keep
    their windows) under CALIBRATION_ATTN. Idempotent."""
    AttentionInterface.register(CALIBRATION_ATTN, needle_echo_attention_forward)
    AttentionMaskInterface.register(CALIBRATION_ATTN, sdpa_mask)


@contextmanager
def needle_echo_attention(model, probe: NeedleEchoProbe) -> Iterator[NeedleEchoProbe]:
    """Switch `model` to the calibration attention for the duration of the block, then restore its
    previous attention implementation (also on error)."""
    global _active_probe
    if _active_probe is not None:
        raise RuntimeError("a calibration pass is already running")
    register_calibration_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(CALIBRATION_ATTN)
    try:
        if model.config._attn_implementation != CALIBRATION_ATTN:
            raise RuntimeError(f"{type(model).__name__} did not switch to the '{CALIBRATION_ATTN}' attention "
                               "function (it does not support set_attn_implementation)")
        _active_probe = probe
        yield probe
    finally:
        _active_probe = None
        model.set_attn_implementation(previous)
