"""The tiled logits/loss path against the plain full-logits losses, and SP validation errors."""
from types import SimpleNamespace

import pytest
import torch

from rtpurbo_train.config import load_recipe
from rtpurbo_train.errors import UserError
from rtpurbo_train.losses import lm_loss, teacher_topk, topk_distillation_loss
from rtpurbo_train.models.tiny import build_tiny_model
from rtpurbo_train.parallel import final_hidden_states, tiled_teacher_topk, tiled_token_losses, validate_sequence_parallel
from tests.e2e.helpers import TINY


def test_tiled_losses_and_gradients_equal_full_logits():
    torch.manual_seed(0)
    B, T, H, V, k = 2, 13, 8, 17, 4
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, 9:] = -100
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    t_logp, t_ids = teacher_topk(torch.randn(B, T, V), k)

    ce, kl = tiled_token_losses(head, hidden, targets, t_logp, t_ids, tile=3)
    n = (targets != -100).sum()
    ((ce + 2 * kl) / n).backward()
    got = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    logits = head(hidden)
    ref_lm = lm_loss(logits, labels)
    ref_kl = topk_distillation_loss(logits[:, :-1], t_logp[:, :-1], t_ids[:, :-1], labels[:, 1:] != -100)
    (ref_lm + 2 * ref_kl).backward()
    torch.testing.assert_close(ce / n, ref_lm)
    torch.testing.assert_close(kl / n, ref_kl)
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], head.weight.grad)

    logp, ids = tiled_teacher_topk(head, hidden.detach(), k, tile=5)
    ref_logp, ref_ids = teacher_topk(head(hidden.detach()), k)
    torch.testing.assert_close(logp, ref_logp)
    assert torch.equal(ids, ref_ids)


def test_final_hidden_states_skip_the_logits():
    model, _ = build_tiny_model("tiny-llama", {}, seed=1, dtype=torch.float32)
    ids = torch.randint(3, 100, (1, 20))
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(out.shape))
    hidden = final_hidden_states(model, lambda: model(input_ids=ids, use_cache=False))
    handle.remove()
    assert calls == [torch.Size([1, 0, model.config.vocab_size])]  # the head saw an empty slice
    torch.testing.assert_close(model.get_output_embeddings()(hidden), model(input_ids=ids).logits)


def _recipe(*sets):
    return load_recipe(str(TINY), list(sets))


def test_sequence_parallel_validation_errors():
    config = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3)  # SmolLM2-135M's heads
    with pytest.raises(UserError, match="9 query heads, not divisible by 2.*valid SP sizes for it: 1, 3, 9"):
        validate_sequence_parallel(_recipe("parallel.sequence_parallel_size=2"), config, 2)
    with pytest.raises(UserError, match="does not divide the world size 2"):
        validate_sequence_parallel(_recipe("parallel.sequence_parallel_size=4"), config, 2)
    config = SimpleNamespace(num_attention_heads=12, num_key_value_heads=3)
    with pytest.raises(UserError, match="3 KV heads"):
        validate_sequence_parallel(_recipe("parallel.sequence_parallel_size=4"), config, 4)
    sp3 = _recipe("parallel.sequence_parallel_size=3", "stages.1.seq_len=384", "stages.2.seq_len=384")
    validate_sequence_parallel(sp3, config, 3)  # divides both head counts
    config = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2)
    validate_sequence_parallel(_recipe("parallel.sequence_parallel_size=4"), config, 8)  # SP multiple of KV heads
    with pytest.raises(UserError, match="seq_len 256 is not divisible"):
        _recipe("parallel.sequence_parallel_size=3")
    with pytest.raises(UserError, match="same micro_batch_size"):
        _recipe("parallel.sequence_parallel_size=2", "stages.1.micro_batch_size=2")


def test_valid_sp_sizes_follow_the_ulysses_head_rules():
    from rtpurbo_train.parallel.validate import valid_sp_sizes
    assert valid_sp_sizes(9, 3) == [1, 3, 9]  # SmolLM2-135M
    assert valid_sp_sizes(12, 2) == [1, 2, 4, 6, 12]  # Qwen2-1.5B: 4 and 6 replicate the 2 KV heads
    assert valid_sp_sizes(28, 4) == [1, 2, 4, 28]  # Qwen2-7B: 7 and 14 split the query heads but not the KV heads
