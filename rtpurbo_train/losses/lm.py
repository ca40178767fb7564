"""Next-token cross-entropy, computed in chunks of positions (long sequences never hold a whole
float32 [T, V] log-softmax at once)."""
import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], labels [B, T] (-100 = ignore; not yet shifted) -> mean over valid targets."""
    logits, targets = logits[:, :-1], labels[:, 1:]
    total = logits.new_zeros((), dtype=torch.float32)
    chunk = max(1, 4096 // max(logits.shape[0], 1))
    for start in range(0, logits.shape[1], chunk):
        sl = slice(start, start + chunk)
        total = total + F.cross_entropy(logits[:, sl].float().flatten(0, 1), targets[:, sl].flatten(),
                                        ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)
