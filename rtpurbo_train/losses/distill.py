"""Top-k logit self-distillation from the dense teacher (RTPurbo stage 2).

The teacher's next-token distribution is kept on its k most likely tokens and renormalised there;
the student is scored with its full-vocabulary log-softmax at those tokens:
`L = sum_{v in topk} p_t(v) (log p_t(v) - log p_s(v))`, averaged over the valid (label != -100)
positions. It is the KL from the truncated teacher to the student, 0 when they agree on the top-k.
"""
import torch


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, V] -> (log-probs renormalised over the top k [B, T, k] float32, token ids [B, T, k])."""
    values, ids = teacher_logits.float().topk(k, dim=-1)
    return values.log_softmax(-1), ids


def topk_distillation_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor,
                           valid: torch.Tensor) -> torch.Tensor:
    """student_logits [B, T, V]; teacher_logp/ids [B, T, k]; valid bool [B, T] -> scalar.

    Computed in chunks of positions so the float32 log-softmax of a long sequence never exists whole.
    """
    B, T, _ = student_logits.shape
    total = student_logits.new_zeros((), dtype=torch.float32)
    chunk = max(1, 4096 // max(B, 1))
    for start in range(0, T, chunk):
        sl = slice(start, start + chunk)
        logp_s = student_logits[:, sl].float().log_softmax(-1).gather(-1, teacher_ids[:, sl])
        p_t = teacher_logp[:, sl].exp()
        kl = (p_t * (teacher_logp[:, sl] - logp_s)).sum(-1)
        total = total + (kl * valid[:, sl]).sum()
    return total / valid.sum().clamp(min=1)
