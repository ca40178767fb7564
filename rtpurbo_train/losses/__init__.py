"""Training losses: LM, top-k self-distillation, SSA alignment. The indexer KL is a kernel
(rtpurbo_kernels.indexer_kl_loss) recorded by the attention layers."""
from .distill import teacher_topk, topk_distillation_loss
from .lm import lm_loss
from .ssa_align import ssa_alignment_loss

__all__ = ["lm_loss", "ssa_alignment_loss", "teacher_topk", "topk_distillation_loss"]
