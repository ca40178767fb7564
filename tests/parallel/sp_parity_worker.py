"""Run by test_sequence_parallel.py under `deepspeed --num_gpus 2` (CPU, gloo): the same two micro-batches
through (a) the SP=1 path on one process in plain PyTorch (reference) and (b) SP=2 with Ulysses, the
loader adapter, a balanced head permutation and a DeepSpeed engine (ZeRO-0, gradient accumulation 2).
Rank 0 writes losses and max gradient differences (mapped back to the original head order) to --out."""
import argparse
import json
from types import SimpleNamespace

import torch

from rtpurbo_train import distributed as dist
from rtpurbo_train.attention import attach_sparsity, attention_modules
from rtpurbo_train.config.stages import LossWeights
from rtpurbo_train.export.head_permutation import undo_kv_head_permutation
from rtpurbo_train.models.tiny import build_tiny_model
from rtpurbo_train.parallel import apply_kv_head_permutation, balanced_kv_head_permutation
from rtpurbo_train.parallel.sp_loader import ulysses_adapter
from rtpurbo_train.parallel.ulysses import enable_sequence_parallel, route_dense_teacher, sequence_parallel_active
from rtpurbo_train.plan import HeadLayout, LayerPlan, SparsityPlan
from rtpurbo_train.trainer.engine import build_engine
from rtpurbo_train.trainer.step_losses import micro_batch_losses

T, GA, SEED = 256, 2, 7
MODES = {  # mode -> loss weights (every loss the mode can have)
    "full": LossWeights(lm=1.0, distill=1.0, indexer_kl=1.0),
    "sparse": LossWeights(lm=1.0, distill=1.0, indexer_kl=1.0),
    "both": LossWeights(lm=1.0, distill=1.0, indexer_kl=1.0, ssa_align=10.0),
}


def make_model():
    model, _ = build_tiny_model("tiny-llama", {"num_attention_heads": 8, "num_key_value_heads": 4}, SEED, torch.float32)
    return model


def make_plan(config):
    # layer 0: retrieval heads 0 and 1 both on SP rank 0 before balancing; layer 1: one head (3, rank 1)
    layout = HeadLayout.from_config(config)
    layers = [LayerPlan(retrieval_kv_heads=[0, 1]), LayerPlan(retrieval_kv_heads=[3])]
    return SparsityPlan(model=layout, layers=layers, window=64, sink_tokens=4, top_p=0.9, block_size=64)


def make_batches(vocab):
    gen = torch.Generator().manual_seed(SEED)
    batches = []
    for pad_from in (200, 150):  # right padding: the two shards hold different numbers of valid targets
        ids = torch.randint(3, vocab, (1, T), generator=gen)
        labels = ids.clone()
        labels[:, pad_from:] = -100
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()})
    return batches


class PlainEngine:
    """The calls micro_batch_losses makes on an engine, for the single-process reference."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


def reference(mode, weights, plan, batches):
    model, teacher = make_model(), make_model().eval().requires_grad_(False)
    runtime = attach_sparsity(model, plan, backend="reference", seed=SEED)
    runtime.set_mode(mode)
    runtime.indexer_kl = True
    model.train()
    stage = SimpleNamespace(losses=weights, distill_topk=4)
    parts_per_micro = []
    for m, batch in enumerate(batches):
        runtime.begin_step(m)
        loss, parts = micro_batch_losses(PlainEngine(model), teacher, runtime, batch, stage)
        (loss / GA).backward()
        parts_per_micro.append({k: float(v) for k, v in parts.items()})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts_per_micro, grads


def sequence_parallel(mode, weights, plan, batches, state):
    model, teacher = make_model(), make_model().eval().requires_grad_(False)
    perm = balanced_kv_head_permutation(plan, 2)
    assert perm is not None and perm[0] != [0, 1, 2, 3], perm
    sp_plan = plan.model_copy(update={"kv_head_permutation": perm})
    apply_kv_head_permutation(attention_modules(model), perm, plan.model.group, plan.model.head_dim)
    runtime = attach_sparsity(model, sp_plan, backend="reference", seed=SEED)
    sp = enable_sequence_parallel(model, 2, micro_batch_size=1)
    route_dense_teacher(teacher, sp_plan, sp, "reference")
    runtime.set_mode(mode)
    runtime.indexer_kl = True
    model.train()
    stage = SimpleNamespace(losses=weights, distill_topk=4, micro_batch_size=1, grad_accum=GA, grad_clip=0.0,
                            lr=0.0, betas=(0.9, 0.95), weight_decay=0.0, steps=1, warmup_steps=0, min_lr_ratio=1.0,
                            type="sparse_train")
    engine = build_engine(model, model.parameters(), stage, {"zero_optimization": {"stage": 0}},
                          device=torch.device("cpu"), dp_world=1, mpu=sp.mpu)
    # each rank's loader yields its own batch; the adapter has the SP group process rank 0's, then rank 1's
    shards = list(ulysses_adapter([batches[dist.rank()]], sp, torch.device("cpu")))
    parts_per_micro = []
    with sequence_parallel_active(runtime, sp):
        for m, batch in enumerate(shards):
            runtime.begin_step(m)
            loss, parts = micro_batch_losses(engine, teacher, runtime, batch, stage)
            engine.backward(loss)
            shares = torch.tensor([float(v) for v in parts.values()], dtype=torch.float64)
            torch.distributed.all_reduce(shares, group=sp.group)  # the SP group's shares add up to the loss
            parts_per_micro.append(dict(zip(parts, shares.tolist())))
            if m < len(shards) - 1:
                engine.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # back to the original head order
    holder = make_model()
    attach_sparsity(holder, sp_plan, backend="reference", seed=SEED)  # same parameter set (indexers)
    for n, p in holder.named_parameters():
        p.data = grads[n].clone() if n in grads else torch.zeros_like(p)
    indexer = {n: p.data for n, p in holder.named_parameters() if ".indexer." in n}
    undo_kv_head_permutation(attention_modules(holder), indexer, [plan.retrieval_kv_heads(i) for i in range(2)],
                             perm, plan.model.group, plan.model.head_dim)
    mapped = {n: (indexer[n] if n in indexer else p.data) for n, p in holder.named_parameters() if n in grads}
    engine.destroy()
    return parts_per_micro, mapped


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    dist.init()
    torch.manual_seed(0)
    plan = make_plan(make_model().config)
    batches = make_batches(make_model().config.vocab_size)
    state = {}
    results = {}
    for mode, weights in MODES.items():
        ref_parts, ref_grads = reference(mode, weights, plan, batches)
        sp_parts, sp_grads = sequence_parallel(mode, weights, plan, batches, state)
        missing = sorted(set(ref_grads) ^ set(sp_grads))
        grad_err = {n: float((sp_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in ref_grads.items()
                    if n in sp_grads}
        results[mode] = {"ref": ref_parts, "sp": sp_parts, "grad_rel_err": grad_err, "missing": missing,
                         "grad_norm": float(torch.stack([g.norm() for g in ref_grads.values()]).norm())}
    if dist.is_main():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
