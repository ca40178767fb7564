"""The KV cache of an exported RTPurbo model: where sparse decoding saves memory.

Per layer (`RTPurboLayerCache`):
- streaming KV heads keep ONLY the sink tokens and the last `window` tokens (`stream_keys/values`
  [B, Hs, <= sink + window, D], with the absolute position of every slot in `stream_pos` [L]);
- retrieval KV heads keep every token (`full_keys/values` [B, Hr, T, D]) plus the indexer keys
  (`indexer_keys` [B, Hr, T, d]) and the indexer mass already accumulated by the earlier queries of the
  current, unfinished query block (`block_mass` [B, Hr, NKB], `block_rows`), so that a decoded token
  selects key blocks exactly as a no-cache forward over the whole sequence selects them for that block;
- in dense mode (prompt shorter than `seqlen_threshold`, or sparsity switched off) every KV head is a
  "full" head and nothing else is stored.

The attention of modeling_rtpurbo.py reads the cached tensors and appends the new tokens itself (the
layout differs per head kind, so transformers' `update(key, value)` protocol does not fit; it raises).
Beam search (`reorder_cache`) and batch expansion work; `crop` does not (evicted tokens are gone).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

MODES = ("sparse", "dense")


class RTPurboLayerCache(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, sink_tokens: int, window: int):
        super().__init__()
        self.sink_tokens = sink_tokens
        self.window = window
        self.seen = 0  # tokens written so far (absolute position of the next token)
        self.full_keys: Optional[torch.Tensor] = None
        self.full_values: Optional[torch.Tensor] = None
        self.indexer_keys: Optional[torch.Tensor] = None
        self.block_mass: Optional[torch.Tensor] = None
        self.block_rows = 0
        self.stream_keys: Optional[torch.Tensor] = None
        self.stream_values: Optional[torch.Tensor] = None
        self.stream_pos: Optional[torch.Tensor] = None

    # ---- what the attention reads and writes ---------------------------------------------------
    def append_full(self, keys: torch.Tensor, values: torch.Tensor, store: bool):
        """keys/values [B, H, T_new, D] -> all keys/values so far [B, H, seen + T_new, D]."""
        if self.full_keys is not None:
            keys = torch.cat([self.full_keys, keys], dim=2)
            values = torch.cat([self.full_values, values], dim=2)
        if store:
            self.full_keys, self.full_values = keys, values
        return keys, values

    def append_indexer_keys(self, ikeys: torch.Tensor, store: bool) -> torch.Tensor:
        """ikeys [B, Hr, T_new, d] -> every indexer key so far [B, Hr, seen + T_new, d]."""
        if self.indexer_keys is not None:
            ikeys = torch.cat([self.indexer_keys, ikeys], dim=2)
        if store:
            self.indexer_keys = ikeys
        return ikeys

    def append_streaming(self, keys: torch.Tensor, values: torch.Tensor, start: int, store: bool):
        """keys/values [B, Hs, T_new, D] at positions start.. -> (keys, values [B, Hs, L, D], positions [L]):
        the kept sink/window slots followed by the new tokens. Stores only what later queries can see:
        positions < sink_tokens and the last `window` positions."""
        end = start + keys.shape[2]
        pos = torch.arange(start, end, device=keys.device)
        if self.stream_keys is not None:
            keys = torch.cat([self.stream_keys, keys], dim=2)
            values = torch.cat([self.stream_values, values], dim=2)
            pos = torch.cat([self.stream_pos, pos])
        if store:
            keep = (pos < self.sink_tokens) | (pos >= end - self.window)
            if bool(keep.all()):
                self.stream_keys, self.stream_values, self.stream_pos = keys, values, pos
            else:
                idx = keep.nonzero().squeeze(1)
                # index_select copies, so the evicted slots are really freed.
                self.stream_keys = keys.index_select(2, idx)
                self.stream_values = values.index_select(2, idx)
                self.stream_pos = pos.index_select(0, idx)
        return keys, values, pos

    def advance(self, num_tokens: int) -> None:
        self.seen += num_tokens

    # ---- accounting ------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Optional[torch.Tensor]]:
        return {"full_keys": self.full_keys, "full_values": self.full_values, "indexer_keys": self.indexer_keys,
                "block_mass": self.block_mass, "stream_keys": self.stream_keys,
                "stream_values": self.stream_values, "stream_pos": self.stream_pos}

    def kv_bytes(self) -> int:
        """Bytes of cached keys and values (what a dense cache would hold for every head)."""
        return sum(t.numel() * t.element_size() for t in
                   (self.full_keys, self.full_values, self.stream_keys, self.stream_values) if t is not None)

    def indexer_bytes(self) -> int:
        """Bytes of the retrieval heads' extra state: indexer keys and the open block's mass."""
        return sum(t.numel() * t.element_size() for t in (self.indexer_keys, self.block_mass) if t is not None)

    # ---- transformers' CacheLayerMixin protocol ------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("RTPurboCache is written by the RTPurbo attention (modeling_rtpurbo.py), not by update(); "
                           "a stock attention module received it")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks are built as for a dense cache; the sparse attention applies its own visibility rule.
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.sink_tokens, self.window)

    def _map_batch(self, fn) -> None:
        for name, tensor in self._tensors().items():
            if tensor is not None and name != "stream_pos":
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an RTPurbo cache cannot be cropped: streaming heads have evicted old tokens")


class RTPurboCache(Cache):
    """One `RTPurboLayerCache` per decoder layer, plus the attention mode of this sequence.

    `mode` is fixed by the first forward (prefill): "dense" when the prompt is shorter than
    `seqlen_threshold` (or sparsity is off), else "sparse"; decoding keeps that mode.
    """

    def __init__(self, num_layers: int, sink_tokens: int, window: int):
        super().__init__(layers=[RTPurboLayerCache(sink_tokens, window) for _ in range(num_layers)])
        self.mode: Optional[str] = None

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

    def indexer_bytes(self) -> int:
        return sum(layer.indexer_bytes() for layer in self.layers)
