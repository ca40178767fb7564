"""Test doubles for the evaluation: a causal model whose greedy predictions are known by construction,
and a runtime with the attributes the evaluation touches."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class FakeRuntime:
    """What `evaluation.passes` uses of a SparseRuntime: mode, indexer_kl, measure, set_mode, pop_metrics."""

    def __init__(self):
        self.mode, self.indexer_kl, self.measure, self.backend = "full", False, False, "fake"
        self.pending: dict[str, float] = {}

    def set_mode(self, mode):
        self.mode = mode

    def pop_metrics(self):
        out, self.pending = self.pending, {}
        return out


class SuccessorLM(nn.Module):
    """Greedy prediction after token x is (x + 1) % vocab: the logit of that token is 1, all others -1.

    In sparse mode, a position holding one of `sparse_blind` tokens predicts token 0 instead, so a
    prompt whose answer is predicted from such a position fails in sparse mode only. Causal (position t
    depends on token t alone). While measuring in sparse mode it leaves `sparsity/mean = T / 1000`.
    """

    def __init__(self, runtime: FakeRuntime, vocab: int = 300, sparse_blind=()):
        super().__init__()
        self.runtime, self.vocab = runtime, vocab
        self.blind = torch.tensor(sorted(sparse_blind), dtype=torch.long)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.forwards = 0

    def forward(self, input_ids, use_cache=True, logits_to_keep=0):
        assert use_cache is False, "the evaluation must run whole sequences without KV cache"
        assert not self.runtime.indexer_kl, "the evaluation must not record the indexer KL"
        self.forwards += 1
        nxt = (input_ids + 1) % self.vocab
        if self.runtime.mode == "sparse" and self.blind.numel():
            nxt = torch.where(torch.isin(input_ids, self.blind), torch.zeros_like(nxt), nxt)
        logits = torch.full((*input_ids.shape, self.vocab), -1.0)
        logits.scatter_(-1, nxt[..., None], 1.0)
        if self.runtime.measure and self.runtime.mode == "sparse":
            self.runtime.pending = {"sparsity/mean": input_ids.shape[1] / 1000.0}
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


class FixedLogitsLM(nn.Module):
    """Returns pre-set logits [1, T, V] per input (looked up by the input's first token); the sparse
    mode adds `sparse_shift` to them. For perplexity checks against a direct computation."""

    def __init__(self, runtime: FakeRuntime, table: dict[int, torch.Tensor], sparse_shift: torch.Tensor):
        super().__init__()
        self.runtime, self.table, self.sparse_shift = runtime, table, sparse_shift
        self.anchor = nn.Parameter(torch.zeros(1))

    def logits_for(self, input_ids, mode):
        logits = self.table[int(input_ids[0, 0])]
        return logits + self.sparse_shift if mode == "sparse" else logits

    def forward(self, input_ids, use_cache=True, logits_to_keep=0):
        logits = self.logits_for(input_ids, self.runtime.mode)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)
