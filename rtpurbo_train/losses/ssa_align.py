"""SSA alignment loss (arXiv 2511.20102): pull the full and sparse attention outputs together.

`L_align = SmoothL1(o_full, sg(o_sparse)) + SmoothL1(sg(o_full), o_sparse)` on the pre-o_proj
outputs of one layer; the trainer averages it over layers and weights it by alpha (10 in the paper).
Each term trains one path towards the other, so tokens the sparse path drops still get gradient
through the full path and the model learns to suppress them.
"""
import torch
import torch.nn.functional as F


def ssa_alignment_loss(o_full: torch.Tensor, o_sparse: torch.Tensor) -> torch.Tensor:
    """o_full, o_sparse [B, T, H, D] -> float32 scalar."""
    o_full, o_sparse = o_full.float(), o_sparse.float()
    return F.smooth_l1_loss(o_full, o_sparse.detach()) + F.smooth_l1_loss(o_full.detach(), o_sparse)
