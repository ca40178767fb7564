"""Comparing two block selections that follow the same rule (`choose_blocks`) with different float summation
orders: equal sets, except (top-p only) candidates at the cut."""
import torch


def assert_same_choice(got, ref, mass, q_blocks, *, top_p, sink, local, exact):
    """got, ref bool [..., NKB]; mass float [..., NKB]; q_blocks int broadcastable to got.shape[:-1].
    Equal sets, except (when not `exact`) candidates (causal blocks that are not sink or local) whose candidate
    mass ranked before them is within 1e-5 of top_p x the candidates' total: there the orders may round
    either way."""
    differ = got != ref
    if not differ.any():
        return
    assert not exact, f"chosen sets differ at {differ.nonzero().tolist()[:8]}"
    nkb = mass.shape[-1]
    kb = torch.arange(nkb)
    q_blocks = q_blocks.expand(got.shape[:-1])
    for row in differ.any(-1).nonzero().tolist():
        row = tuple(row)
        qb = int(q_blocks[row])
        candidate = (kb <= qb) & (kb >= sink) & (kb <= qb - local)
        vals, order = torch.sort(torch.where(candidate, mass[row].float(), float("-inf")), descending=True,
                                 stable=True)
        vals = torch.where(torch.isfinite(vals), vals, 0.0)
        before = torch.cumsum(vals, 0) - vals
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(nkb))
        for j in differ[row].nonzero().flatten().tolist():
            assert bool(candidate[j]), f"forced or non-causal block {j} of row {row} differs"
            gap = abs(float(before[rank[j]]) - top_p * float(vals.sum()))
            assert gap < 1e-5, f"block {j} of row {row} differs; its mass-before is {gap:.2e} from the cut"
