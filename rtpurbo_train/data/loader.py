"""The training loader: an endless, resumable, data-parallel-sharded stream of padded batches.

Sampling is defined on one *global* stream of draws shared by all data-parallel ranks:
- draw `g` picks a source from the mixture weights with a uniform number that depends only on
  (seeds, g), computed in blocks;
- the `c`-th draw of source `s` takes position `c mod n_s` of that source's permutation for pass
  `c // n_s` (a fresh seeded shuffle per pass over the source, i.e. per epoch);
- step `k` consumes draws `[k*B*W, (k+1)*B*W)` (B micro batch, W data-parallel ranks); rank `r`
  keeps draws `[k*B*W + r*B, k*B*W + (r+1)*B)`.
So within a pass over a source no two ranks ever get the same sequence, and the W ranks together
see exactly what one rank with micro batch `B*W` would see. The whole position is
`(global draws, draws per source)`, which is the state saved in checkpoints.

With sequence parallelism the trainer shards by global rank and wraps the loader in DeepSpeed's
`UlyssesSPDataLoaderAdapter`, which has each SP group work through its ranks' batches in turn
(rtpurbo_train/parallel/sp_loader.py).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .corpus import PreparedSource
from .packing import collate

STATE_VERSION = 1
UNIFORM_BLOCK = 4096  # mixture draws generated per RNG call


class TrainLoader:
    """Infinite iterator of batches `{"input_ids", "labels", "attention_mask"}`, each [B, T] int64
    (see `packing.collate`). `state_dict()` / `load_state_dict()` resume exactly; `stats()` counts."""

    def __init__(self, sources: list[PreparedSource], *, seq_len: int, micro_batch_size: int, seed: int,
                 shuffle_seed: int, dp_rank: int, dp_world: int, pad_id: int):
        if not sources:
            raise UserError("no data sources to train on")
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world={dp_world})")
        if micro_batch_size < 1 or seq_len < 1:
            raise ValueError("micro_batch_size and seq_len must be >= 1")
        self.sources = sources
        self.seq_len, self.batch, self.rank, self.world, self.pad_id = seq_len, micro_batch_size, dp_rank, dp_world, pad_id
        self._key = [int(shuffle_seed), int(seed)]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self._cum = np.cumsum(weights / weights.sum())
        self._sizes = [len(s.sequences) for s in sources]
        self.global_draws = 0
        self.source_draws = [0] * len(sources)
        self._block = (-1, None)
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self.fingerprint = self._fingerprint()

    # ---- sampling ------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        # From what the stream is made of (not file times), so a copied or touched dataset still resumes.
        desc = [(s.name, s.weight, len(s.sequences), int(s.sequences.length.sum())) for s in self.sources]
        return hashlib.sha256(json.dumps([desc, self.seq_len, self._key]).encode()).hexdigest()[:16]

    def _uniform(self, g: int) -> float:
        b = g // UNIFORM_BLOCK
        if self._block[0] != b:
            self._block = (b, np.random.default_rng([*self._key, 0x6D1, b]).random(UNIFORM_BLOCK))
        return float(self._block[1][g % UNIFORM_BLOCK])

    def _source_of(self, g: int) -> int:
        return min(int(np.searchsorted(self._cum, self._uniform(g), side="right")), len(self.sources) - 1)

    def _permutation(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perms:
            for old in [k for k in self._perms if k[0] == s and k[1] < epoch - 1]:
                del self._perms[old]  # keep at most this pass and the previous one per source
            self._perms[key] = np.random.default_rng([*self._key, 0x5EED, s, epoch]).permutation(self._sizes[s])
        return self._perms[key]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        mine = range(self.rank * self.batch, (self.rank + 1) * self.batch)
        rows = []
        for j in range(self.batch * self.world):
            s = self._source_of(self.global_draws + j)
            epoch, pos = divmod(self.source_draws[s], self._sizes[s])
            self.source_draws[s] += 1
            if j in mine:
                rows.append(self.sources[s].sequence_tokens(int(self._permutation(s, epoch)[pos])))
        self.global_draws += self.batch * self.world
        return collate(rows, self.seq_len, self.pad_id)

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position. Valid for any `dp_world` / micro batch on resume (the stream is global)."""
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "global_draws": self.global_draws,
                "source_draws": list(self.source_draws)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint:
            raise UserError("the checkpoint's data position belongs to other data or data settings (sources, weights, "
                            "seq_len, filters, seeds changed); resume with the same data config or start a new run")
        self.global_draws = int(state["global_draws"])
        self.source_draws = [int(c) for c in state["source_draws"]]

    # ---- monitoring ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters for logging: documents and sequences per source, skipped records by reason,
        epochs (passes over each source's sequences; `epoch` for the whole mixture)."""
        skipped: dict[str, int] = {}
        for s in self.sources:
            for reason, n in s.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
        total = sum(self._sizes)
        return {
            "documents": int(sum(len(s.train_docs) for s in self.sources)),
            "eval_documents": int(sum(s.eval_docs for s in self.sources)),
            "sequences": int(total),
            "tokens": int(sum(int(s.sequences.length.sum()) for s in self.sources)),
            "skipped": dict(sorted(skipped.items())),
            "tail_tokens_dropped": int(sum(s.tail_tokens_dropped for s in self.sources)),
            "samples_drawn": int(self.global_draws),
            "epoch": self.global_draws / total,
            "sources": [
                {"name": s.name, "documents": int(len(s.train_docs)), "sequences": size, "epoch": draws // size, "skipped": s.skipped}
                for s, size, draws in zip(self.sources, self._sizes, self.source_draws)
            ],
        }
