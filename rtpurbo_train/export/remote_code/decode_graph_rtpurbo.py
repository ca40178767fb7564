"""CUDA graphs of the exported RTPurbo model's decode step (shipped with modeling_rtpurbo.py).

A decode step (one new token per row, cache present) is fixed-shape and never syncs with the host: it
reads the cache's whole buffers, takes positions from a device tensor that it advances in place, and
writes the new token's keys at those positions. Such a step can be recorded once and replayed: the
replay launches the recorded kernels (~40 per layer) as one graph, so a decode step costs the GPU time
of its kernels instead of the Python and launch time of a thousand small operations.

Rules:
- a graph is valid while the cache's buffers stay where they are (`RTPurboCache.buffer_pointers()`) and
  the input shape is the same; a buffer that grows (the cache is full) or is reordered (beam search)
  makes the next step run eagerly, and the step after it is recorded again;
- a step is recorded only after an eager step on the very same buffers (which compiles the Triton
  kernels and warms cuBLAS); recording does not run the kernels, so the recorded step is then replayed
  once for real;
- recording runs the step's Python code once (each layer's host-side token count advances then); every
  replay advances it by hand (`RTPurboCache.advance`);
- if recording fails (an operation that cannot be captured), a warning is printed once and the model
  decodes eagerly from then on; the failed step's host-side state is restored and it runs eagerly.
"""
from __future__ import annotations

import warnings

import torch


class DecodeGraphs:
    """The recorded decode step of one model (one graph at a time: the latest cache and batch)."""

    def __init__(self):
        self.enabled = True
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key = None  # (input shape, buffer pointers) the graph was recorded on
        self.warm_key = None  # (input shape, buffer pointers) after the last eager step
        self.static_ids: torch.Tensor | None = None
        self.static_out = None
        self.replays = 0  # decode steps served by a replay (for tests and benchmarks)

    @staticmethod
    def _key(input_ids: torch.Tensor, cache) -> tuple:
        return tuple(input_ids.shape), cache.buffer_pointers()

    def step(self, input_ids: torch.Tensor, cache, eager_step):
        """Run one decode step: a replay when possible, else `eager_step(input_ids)`; returns its output."""
        if not self.enabled or not cache.has_room_for_step():
            return self._eager(input_ids, cache, eager_step)
        key = self._key(input_ids, cache)
        if self.graph is not None and key == self.key:
            self.static_ids.copy_(input_ids)
            self.graph.replay()
            cache.advance(1)
            self.replays += 1
            return self._output()
        if key != self.warm_key:
            return self._eager(input_ids, cache, eager_step)
        return self._record_and_replay(input_ids, cache, eager_step, key)

    def _eager(self, input_ids, cache, eager_step):
        out = eager_step(input_ids)
        self.warm_key = self._key(input_ids, cache)
        return out

    def _output(self):
        # The graph writes its logits into the same memory every replay: hand out a copy.
        out = self.static_out
        return type(out)(logits=out.logits.clone(), past_key_values=out.past_key_values)

    def _record_and_replay(self, input_ids, cache, eager_step, key):
        self.graph = self.static_out = None  # free the previous graph's memory first
        seen = [layer.seen for layer in cache.layers]
        static_ids = input_ids.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                static_out = eager_step(static_ids)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager decoding
            for layer, n in zip(cache.layers, seen):
                layer.seen = n
            self.enabled = False
            warnings.warn(f"RTPurbo: the decode step could not be recorded as a CUDA graph ({err}); decoding "
                          "eagerly from now on", RuntimeWarning, stacklevel=3)
            return self._eager(input_ids, cache, eager_step)
        self.graph, self.key, self.static_ids, self.static_out = graph, key, static_ids, static_out
        graph.replay()  # recording ran the Python (host counts advanced) but not the kernels
        self.replays += 1
        return self._output()
