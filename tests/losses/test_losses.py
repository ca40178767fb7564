import math

import torch
import torch.nn.functional as F

from rtpurbo_train.losses import lm_loss, ssa_alignment_loss, teacher_topk, topk_distillation_loss


def test_topk_distillation_against_hand_computed_values():
    teacher = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    student = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    logp_t, ids = teacher_topk(teacher, 2)
    assert ids.tolist() == [[[0, 1]]]
    p0, p1 = math.exp(2) / (math.exp(2) + math.e), math.e / (math.exp(2) + math.e)
    z = 3 + math.e  # student partition function
    ls0, ls1 = math.log(1 / z), math.log(math.e / z)
    expected = p0 * (math.log(p0) - ls0) + p1 * (math.log(p1) - ls1)
    loss = topk_distillation_loss(student, logp_t, ids, torch.tensor([[True]]))
    assert abs(loss.item() - expected) < 1e-6


def test_distillation_is_zero_only_when_student_matches_on_the_topk_and_masks_positions():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 11)
    logp_t, ids = teacher_topk(t, 11)  # k = V: the full KL
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    assert topk_distillation_loss(t.clone(), logp_t, ids, valid).abs().item() < 1e-6
    s = torch.randn(2, 5, 11)
    full_kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    expected = full_kl[valid].mean()
    assert abs(topk_distillation_loss(s, logp_t, ids, valid).item() - expected.item()) < 1e-5


def test_lm_loss_matches_shifted_cross_entropy_with_ignored_labels():
    torch.manual_seed(1)
    logits = torch.randn(2, 7, 13)
    labels = torch.randint(0, 13, (2, 7))
    labels[0, 5:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(lm_loss(logits, labels).item() - expected.item()) < 1e-6


def test_ssa_alignment_value_and_gradients():
    o_full = torch.tensor([0.0, 2.0], requires_grad=True)
    o_sparse = torch.tensor([0.5, 0.0], requires_grad=True)
    loss = ssa_alignment_loss(o_full, o_sparse)
    # SmoothL1(beta=1): 0.5*0.25 = 0.125 and |2|-0.5 = 1.5 -> mean 0.8125, counted twice
    assert abs(loss.item() - 2 * 0.8125) < 1e-6
    loss.backward()
    # each side gets only its own term's gradient: d/dx mean(smoothl1(x - y)) = clip(x - y, -1, 1) / 2
    torch.testing.assert_close(o_full.grad, torch.tensor([-0.25, 0.5]))
    torch.testing.assert_close(o_sparse.grad, torch.tensor([0.25, -0.5]))
