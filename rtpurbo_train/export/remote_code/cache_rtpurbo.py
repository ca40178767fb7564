"""The KV cache of an exported RTPurbo model: where sparse decoding saves memory.

Per layer (`RTPurboLayerCache`), all in preallocated buffers that are written in place:
- streaming KV heads keep ONLY the sink tokens and the last `window` tokens, in a buffer of at most
  sink + window slots [B, Hs, <= sink + window, D] (it grows like the others up to that size, then stays):
  position p < sink sits in slot p, a later position in slot sink + (p - sink) % window (a ring). The filled slots are always a prefix of the buffer, and after
  writing position t every filled slot is visible to the query at t, so a decode step attends to the
  prefix with no mask. `stream_pos` gives each filled slot's position (computed, not stored);
- retrieval KV heads keep every token (`full_keys/values` [B, Hr, T, D]) plus the indexer keys
  (`indexer_keys` [B, Hr, T, d], float32: the selection scores them in float32) and the indexer mass already
  accumulated by the earlier queries of the current, unfinished query block (`block_mass` [B, Hr, NKB]),
  so that a decoded token selects key blocks exactly as a no-cache forward over the whole sequence selects
  them for that block. Their buffers grow by capacity doubling (amortised O(1) append; `reserve`, e.g.
  generate()'s max_length, sizes the first allocation so that generation never regrows), in multiples of
  the block size; the slots past the filled prefix are zeros. `full_keys`, `indexer_keys`, ... are views of
  the filled prefix;
- in dense mode (prompt shorter than `seqlen_threshold`, or sparsity switched off) every KV head is a
  "full" head and nothing else is stored.

Appending never copies the cached tokens except when a buffer grows. `kv_bytes()` counts the live KV
entries (what a dense cache of the same tokens would count per head); `allocated_bytes()` the buffers,
spare capacity included.

The attention of modeling_rtpurbo.py reads the cached tensors and appends the new tokens itself (the
layout differs per head kind, so transformers' `update(key, value)` protocol does not fit; it raises).
Beam search (`reorder_cache`) and batch expansion work; `crop` does not (evicted tokens are gone).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

MODES = ("sparse", "dense")
BUFFERS = ("_full_k", "_full_v", "_ikeys", "_stream_k", "_stream_v", "block_mass")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class RTPurboLayerCache(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, sink_tokens: int, window: int, block_size: int = 1, reserve: int = 0):
        super().__init__()
        self.sink_tokens = sink_tokens
        self.window = window
        self.block_size = block_size
        self.reserve = reserve  # tokens the first allocation of a growing buffer makes room for
        self.seen = 0  # tokens written so far (absolute position of the next token)
        self._full_k: Optional[torch.Tensor] = None  # [B, H, capacity, D]
        self._full_v: Optional[torch.Tensor] = None
        self._ikeys: Optional[torch.Tensor] = None  # float32 [B, Hr, capacity, d]
        self._stream_k: Optional[torch.Tensor] = None  # [B, Hs, sink + window, D]
        self._stream_v: Optional[torch.Tensor] = None
        self.block_mass: Optional[torch.Tensor] = None  # float32 [B, Hr, NKB], or None between blocks

    # ---- views of the filled slots ---------------------------------------------------------------------
    @staticmethod
    def _prefix(buf: Optional[torch.Tensor], slots: int) -> Optional[torch.Tensor]:
        return None if buf is None else buf[:, :, :slots]

    @property
    def full_keys(self) -> Optional[torch.Tensor]:
        return self._prefix(self._full_k, self.seen)

    @property
    def full_values(self) -> Optional[torch.Tensor]:
        return self._prefix(self._full_v, self.seen)

    @property
    def indexer_keys(self) -> Optional[torch.Tensor]:
        return self._prefix(self._ikeys, self.seen)

    @property
    def stream_slots(self) -> int:
        """Filled slots of the streaming buffer (always its prefix)."""
        return min(self.seen, self.sink_tokens + self.window)

    @property
    def stream_keys(self) -> Optional[torch.Tensor]:
        return self._prefix(self._stream_k, self.stream_slots)

    @property
    def stream_values(self) -> Optional[torch.Tensor]:
        return self._prefix(self._stream_v, self.stream_slots)

    @property
    def stream_pos(self) -> Optional[torch.Tensor]:
        """int64 [stream_slots]: the absolute position held by each filled streaming slot."""
        if self._stream_k is None:
            return None
        sink, window = self.sink_tokens, self.window
        slot = torch.arange(self.stream_slots, device=self._stream_k.device)
        newest = self.seen - 1 - sink  # ring offset of the newest position
        ring = sink + newest - (newest - (slot - sink)) % window
        return torch.where(slot < sink, slot, ring)

    # ---- what the attention writes -------------------------------------------------------------------------
    def _grown(self, buf: Optional[torch.Tensor], new: torch.Tensor, dtype=None, limit=None) -> torch.Tensor:
        """`buf` with room for seen + new.shape[2] tokens (at most `limit` slots): itself, or a buffer of at least
        twice the capacity (zero-filled, the filled prefix copied over)."""
        capacity = 0 if buf is None else buf.shape[2]
        needed = min(self.seen + new.shape[2], limit or float("inf"))
        if needed <= capacity:
            return buf
        capacity = _round_up(max(needed, 2 * capacity, self.reserve), self.block_size)
        capacity = min(capacity, limit or capacity)
        B, H, _, X = new.shape
        grown = torch.zeros(B, H, capacity, X, dtype=dtype or new.dtype, device=new.device)
        if buf is not None:
            grown[:, :, :self.seen] = buf[:, :, :self.seen]
        return grown

    def append_full(self, keys: torch.Tensor, values: torch.Tensor):
        """keys/values [B, H, T_new, D] -> views of all keys/values so far [B, H, seen + T_new, D]."""
        self._full_k, self._full_v = self._grown(self._full_k, keys), self._grown(self._full_v, values)
        end = self.seen + keys.shape[2]
        self._full_k[:, :, self.seen:end] = keys
        self._full_v[:, :, self.seen:end] = values
        return self._full_k[:, :, :end], self._full_v[:, :, :end]

    def append_indexer_keys(self, ikeys: torch.Tensor) -> torch.Tensor:
        """ikeys [B, Hr, T_new, d] -> float32 view of every indexer key so far [B, Hr, seen + T_new, d]."""
        self._ikeys = self._grown(self._ikeys, ikeys, torch.float32)
        end = self.seen + ikeys.shape[2]
        self._ikeys[:, :, self.seen:end] = ikeys
        return self._ikeys[:, :, :end]

    def indexer_key_blocks(self, num_tokens: int) -> torch.Tensor:
        """float32 [B, Hr, num_tokens rounded up to whole blocks, d]: the keys, then zeros (capacity is a
        multiple of the block size)."""
        return self._ikeys[:, :, :_round_up(num_tokens, self.block_size)]

    def _write_streaming(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store what later queries can see of the new tokens (positions seen..): the sink positions and the
        last `window` positions, in their slots (slice copies only)."""
        sink, window = self.sink_tokens, self.window
        # Until the ring wraps, position p sits in slot p: growing keeps every token in place.
        self._stream_k = self._grown(self._stream_k, keys, limit=sink + window)
        self._stream_v = self._grown(self._stream_v, values, limit=sink + window)
        start, end = self.seen, self.seen + keys.shape[2]
        spans = []
        if start < sink:
            spans.append((start, min(end, sink), start))
        first = max(start, sink, end - window)  # ring positions first..end-1 (at most `window` of them)
        if first < end:
            slot = (first - sink) % window
            split = min(end, first + window - slot)  # the ring wraps after this position
            spans += [(first, split, sink + slot), (split, end, sink)]
        for a, b, slot in spans:
            if a < b:
                self._stream_k[:, :, slot:slot + b - a] = keys[:, :, a - start:b - start]
                self._stream_v[:, :, slot:slot + b - a] = values[:, :, a - start:b - start]

    def append_streaming(self, keys: torch.Tensor, values: torch.Tensor):
        """keys/values [B, Hs, T_new, D] at positions seen.. -> (keys, values [B, Hs, L, D], positions [L]):
        the kept slots followed by the new tokens (copies, so the queries of a multi-token step still see the
        slots their new tokens evict); the buffer then holds what later queries can see."""
        pos = torch.arange(self.seen, self.seen + keys.shape[2], device=keys.device)
        all_keys, all_values = keys, values
        if self._stream_k is not None:
            all_keys = torch.cat([self.stream_keys, keys], dim=2)
            all_values = torch.cat([self.stream_values, values], dim=2)
            pos = torch.cat([self.stream_pos, pos])
        self._write_streaming(keys, values)
        return all_keys, all_values, pos

    def append_streaming_step(self, keys: torch.Tensor, values: torch.Tensor):
        """One new token [B, Hs, 1, D] at position seen -> views [B, Hs, L, D] of every slot that token's
        query sees (the filled prefix, itself included; the token it evicts is out of its window)."""
        self._write_streaming(keys, values)
        filled = min(self.seen + 1, self.sink_tokens + self.window)
        return self._stream_k[:, :, :filled], self._stream_v[:, :, :filled]

    def advance(self, num_tokens: int) -> None:
        self.seen += num_tokens

    # ---- one decode step: whole buffers, positions on the device (no host sync, CUDA-graph safe) -----------
    def _any_buffer(self) -> torch.Tensor:
        return self._full_k if self._full_k is not None else self._stream_k

    def _rows(self, device) -> torch.Tensor:
        buf = self._any_buffer()
        if getattr(self, "_row_index", None) is None or self._row_index.shape[0] != buf.shape[0] \
                or self._row_index.device != device:
            self._row_index = torch.arange(buf.shape[0], device=device)
        return self._row_index

    def full_step(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor):
        """keys/values [B, H, 1, D] of the tokens at positions pos [B] -> the whole buffers [B, H, C, D] with
        them written at slot pos (C > every pos: grown here, on the host's count, before any write)."""
        self._full_k, self._full_v = self._grown(self._full_k, keys), self._grown(self._full_v, values)
        rows = self._rows(keys.device)
        self._full_k[rows, :, pos] = keys[:, :, 0]
        self._full_v[rows, :, pos] = values[:, :, 0]
        return self._full_k, self._full_v

    def indexer_step(self, ikeys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ikeys [B, Hr, 1, d] at positions pos -> the whole float32 buffer [B, Hr, C, d] (C as full_step)."""
        self._ikeys = self._grown(self._ikeys, ikeys, torch.float32)
        self._ikeys[self._rows(ikeys.device), :, pos] = ikeys[:, :, 0].float()
        return self._ikeys

    def _stream_buffer_at_full_size(self, like: torch.Tensor, buf: Optional[torch.Tensor]) -> torch.Tensor:
        slots = self.sink_tokens + self.window
        if buf is not None and buf.shape[2] == slots:
            return buf
        B, H, _, D = like.shape
        full = torch.zeros(B, H, slots, D, dtype=like.dtype, device=like.device)
        if buf is not None:
            full[:, :, :buf.shape[2]] = buf  # until the ring wraps, position p sits in slot p
        return full

    def streaming_step(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor):
        """keys/values [B, Hs, 1, D] at positions pos -> the whole ring buffers [B, Hs, sink + window, D]
        with them written in their slots; slots < min(pos + 1, sink + window) are what each row's query sees."""
        self._stream_k = self._stream_buffer_at_full_size(keys, self._stream_k)
        self._stream_v = self._stream_buffer_at_full_size(values, self._stream_v)
        sink = self.sink_tokens
        slot = torch.where(pos < sink, pos, sink + (pos - sink) % self.window)
        rows = self._rows(keys.device)
        self._stream_k[rows, :, slot] = keys[:, :, 0]
        self._stream_v[rows, :, slot] = values[:, :, 0]
        return self._stream_k, self._stream_v

    def carry_buffer(self, like: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """`block_mass` as a float32 buffer [B, Hr, num_blocks] that a decode step updates in place (zeros past
        the open block; a narrower carry left by a prefill is copied in)."""
        mass = self.block_mass
        if mass is not None and mass.shape[-1] == num_blocks:
            return mass
        full = torch.zeros(*like.shape[:2], num_blocks, dtype=torch.float32, device=like.device)
        if mass is not None:
            full[..., :mass.shape[-1]] = mass
        self.block_mass = full
        return full

    # ---- accounting ------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Optional[torch.Tensor]]:
        return {name: getattr(self, name) for name in BUFFERS}

    @staticmethod
    def _token_bytes(buf: Optional[torch.Tensor]) -> int:
        """Bytes one token takes in `buf` [B, H, slots, X] (all batch rows and heads)."""
        return 0 if buf is None else buf.shape[0] * buf.shape[1] * buf.shape[3] * buf.element_size()

    def kv_bytes(self) -> int:
        """Bytes of the live cached keys and values (what a dense cache would hold for every head)."""
        full = self._token_bytes(self._full_k) + self._token_bytes(self._full_v)
        stream = self._token_bytes(self._stream_k) + self._token_bytes(self._stream_v)
        return full * self.seen + stream * self.stream_slots

    def indexer_bytes(self) -> int:
        """Bytes of the retrieval heads' live extra state: indexer keys and the open block's mass."""
        mass = 0 if self.block_mass is None else self.block_mass.numel() * self.block_mass.element_size()
        return self._token_bytes(self._ikeys) * self.seen + mass

    def allocated_bytes(self) -> int:
        """Bytes of every buffer this layer holds, spare capacity included."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values() if t is not None)

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
        self.__init__(self.sink_tokens, self.window, self.block_size, self.reserve)

    def _map_batch(self, fn) -> None:
        for name, tensor in self._tensors().items():
            if tensor is not None:
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
    `seqlen_threshold` (or sparsity is off), else "sparse"; decoding keeps that mode. A caller may set it
    before the prefill to force one. A left-padded batch takes the mode of its longest prompt.
    """

    def __init__(self, num_layers: int, sink_tokens: int, window: int, block_size: int = 1, reserve: int = 0):
        super().__init__(layers=[RTPurboLayerCache(sink_tokens, window, block_size, reserve)
                                 for _ in range(num_layers)])
        self.mode: Optional[str] = None
        # int64 [B]: each row's next position (its length so far), on the model's device. Decode steps read
        # it and advance it in place (so a captured CUDA graph replays correctly); rows of one batch may
        # differ (a left-padded prompt batch). Each layer's `seen` is the longest row.
        self.positions: Optional[torch.Tensor] = None
        self.ragged = False  # rows of different lengths (decode steps only)

    def advance(self, num_tokens: int) -> None:
        """Host-side token counts of every layer (a replayed decode step advances only the device state)."""
        for layer in self.layers:
            layer.advance(num_tokens)

    def has_room_for_step(self) -> bool:
        """Whether one more token fits every layer's full buffers without growing them."""
        return all(layer._full_k is None or layer._full_k.shape[2] > layer.seen for layer in self.layers)

    def set_lengths(self, lengths: list[int], device) -> None:
        """After a prefill or extend: every row's length (host values, copied to the device once)."""
        self.positions = torch.tensor(lengths, dtype=torch.long, device=device)
        self.ragged = len(set(lengths)) > 1

    def adopt_rows(self, rows: list["RTPurboCache"], mode: str) -> None:
        """Become the batch of the one-row caches `rows` (prefilled separately, lengths may differ): each
        buffer stacks the rows' buffers, zero-padded to the widest; `seen` is the longest row."""
        self.mode = mode
        for i, layer in enumerate(self.layers):
            parts = [row.layers[i] for row in rows]
            for name in BUFFERS:
                tensors = [getattr(part, name) for part in parts]
                present = [t for t in tensors if t is not None]
                if not present:
                    setattr(layer, name, None)
                    continue
                like = present[0]  # [1, H, slots (or blocks for block_mass), ...]
                width = max(t.shape[2] for t in present)
                stacked = like.new_zeros(len(rows), like.shape[1], width, *like.shape[3:])
                for b, t in enumerate(tensors):
                    if t is not None:
                        stacked[b, :, :t.shape[2]] = t[0]
                setattr(layer, name, stacked)
            layer.seen = max(part.seen for part in parts)
        self.set_lengths([row.get_seq_length() for row in rows], rows[0].layers[0]._any_buffer().device)

    def row_lengths(self) -> list[int]:
        """Host copy of `positions` (a device sync: for tests and reports, never inside a step)."""
        return [] if self.positions is None else self.positions.tolist()

    def _map_positions(self, fn) -> None:
        if self.positions is not None:
            self.positions = fn(self.positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_positions(lambda p: p.index_select(0, beam_idx.to(p.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_positions(lambda p: p.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_positions(lambda p: p[indices])

    def reset(self) -> None:
        super().reset()
        self.mode, self.positions, self.ragged = None, None, False

    def buffer_pointers(self) -> tuple:
        """Addresses of every buffer a decode step reads or writes: a captured decode graph is valid while
        they are unchanged (a buffer that grows or is reordered moves)."""
        ptrs = [0 if self.positions is None else self.positions.data_ptr()]
        for layer in self.layers:
            ptrs += [0 if t is None else t.data_ptr() for t in layer._tensors().values()]
        return tuple(ptrs)

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

    def indexer_bytes(self) -> int:
        return sum(layer.indexer_bytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)
