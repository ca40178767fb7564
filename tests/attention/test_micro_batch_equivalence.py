"""A micro-batch of 2 full-length sequences trains exactly like 2 micro-batches of 1 with gradient
accumulation 2 (DeepSpeed divides each micro-batch loss by the accumulation steps): same loss, same
gradients, in every attention mode with every loss on. Recipes may trade accumulation for a larger
micro-batch (fewer kernel launches per token) without changing the run."""
from types import SimpleNamespace

import pytest
import torch

from rtpurbo_train.attention import attach_sparsity
from rtpurbo_train.config.stages import LossWeights
from rtpurbo_train.models.tiny import build_tiny_model
from rtpurbo_train.plan import HeadLayout, LayerPlan, SparsityPlan
from rtpurbo_train.trainer.step_losses import micro_batch_losses

T, SEED = 192, 3


class PlainEngine:
    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


def student_and_teacher():
    build = lambda: build_tiny_model("tiny-llama", {}, SEED, torch.float32)[0]  # noqa: E731
    model, teacher = build(), build().eval().requires_grad_(False)
    layout = HeadLayout.from_config(model.config)
    plan = SparsityPlan(model=layout, layers=[LayerPlan(retrieval_kv_heads=[1]), LayerPlan(retrieval_kv_heads=[0])],
                        window=64, sink_tokens=4, top_p=0.8, block_size=64)
    runtime = attach_sparsity(model, plan, backend="reference", seed=SEED)
    runtime.indexer_kl = True
    model.train()
    return model, teacher, runtime


def losses_and_grads(mode, weights, ids, micro_batches):
    model, teacher, runtime = student_and_teacher()
    runtime.set_mode(mode)
    stage = SimpleNamespace(losses=weights, distill_topk=4)
    total = 0.0
    for chunk in ids.chunk(micro_batches):
        runtime.begin_step(0)  # the same SSA path for every micro-batch
        loss, _ = micro_batch_losses(PlainEngine(model), teacher, runtime, {"input_ids": chunk, "labels": chunk}, stage)
        (loss / micro_batches).backward()
        total += float(loss.detach()) / micro_batches
    return total, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,weights", [
    ("sparse", LossWeights(lm=1.0, distill=1.0, indexer_kl=1.0)),
    ("both", LossWeights(lm=1.0, distill=1.0, indexer_kl=1.0, ssa_align=10.0)),
])
def test_micro_batch_of_two_equals_two_accumulated_micro_batches(mode, weights):
    vocab = build_tiny_model("tiny-llama", {}, SEED, torch.float32)[0].config.vocab_size
    ids = torch.randint(3, vocab, (2, T), generator=torch.Generator().manual_seed(SEED))
    loss_2, grads_2 = losses_and_grads(mode, weights, ids, micro_batches=1)
    loss_11, grads_11 = losses_and_grads(mode, weights, ids, micro_batches=2)
    assert loss_2 == pytest.approx(loss_11, rel=1e-5)
    assert grads_2.keys() == grads_11.keys() and any(".indexer." in n for n in grads_2)
    for name, g in grads_11.items():
        torch.testing.assert_close(grads_2[name], g, rtol=1e-4, atol=1e-6, msg=name)
