"""DeepSpeed Ulysses around the `rtpurbo` attention.

`UlyssesSPAttentionHF.register_with_transformers` replaces the `rtpurbo` entry of transformers'
attention registry with a wrapper: q/k/v of the local T/sp tokens and all heads go through an
all-to-all, our attention function runs on the whole sequence for Hq/sp query heads, and a second
all-to-all brings the output back to the token shard. What our function needs on top:
- each layer's sparsity constants for the rank's head slice (`head_slices.localize_layer`);
- cos/sin for the gathered sequence (recomputed from the gathered position_ids with the model's own
  rotary embedding, see `attention/dispatch._rope_for`);
- position_ids in every forward (Ulysses' requirement; the loader adapter shards them).
The `mpu` it returns goes to `deepspeed.initialize` so gradients are reduced over all ranks with the
SP-aware scaling.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..attention import ATTENTION_NAME, attention_modules
from ..attention.runtime import LayerSparsity, SparseRuntime
from .head_slices import localize_layer
from .validate import head_counts


@dataclass
class SequenceParallel:
    """The SP group of this rank. `rotary(x, position_ids) -> (cos, sin)` is the model's rotary embedding."""
    size: int
    rank: int
    group: object
    mpu: object
    rotary: torch.nn.Module
    wrapper: object  # Ulysses' attention function around ours, switched on by `sequence_parallel_active`

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a (non-differentiable) tensor over the SP group."""
        out = value.detach().clone()
        torch.distributed.all_reduce(out, group=self.group)
        return out


_STATE: dict[str, SequenceParallel] = {}


def enable_sequence_parallel(model, sp_size: int, micro_batch_size: int) -> SequenceParallel | None:
    """Set up Ulysses around the `rtpurbo` attention (once per process; the model must already use it,
    see `attach_sparsity`) and create the SP groups. Returns None for sp_size 1.

    Ulysses installs its wrapper as a local override in transformers' registry; we take it out again
    and switch it on only while training (`sequence_parallel_active`), so the stages in between
    (evaluation, export) run whole sequences on every rank as without SP."""
    if sp_size == 1:
        return None
    if "sp" in _STATE:
        if _STATE["sp"].size != sp_size:
            raise RuntimeError(f"sequence parallelism is already set up with size {_STATE['sp'].size}")
        return _STATE["sp"]
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=base, core_attn_implementation=ATTENTION_NAME, sequence_parallel_size=sp_size,
        micro_batch_size=micro_batch_size, seq_length_is_variable=True)
    wrapper = ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME]
    del ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME]  # the local override only; the global entry is ours
    _STATE["sp"] = SequenceParallel(size=sp_size, rank=mpu.get_sequence_parallel_rank(),
                                    group=mpu.get_sequence_parallel_group(), mpu=mpu, rotary=rotary_embedding(base),
                                    wrapper=wrapper)
    return _STATE["sp"]


@contextmanager
def sequence_parallel_active(runtime: SparseRuntime, sp: SequenceParallel | None):
    """Inside: the `rtpurbo` attention runs under Ulysses and `runtime` holds this rank's head slice.
    Outside: the plain attention function and all heads."""
    if sp is None:
        yield
        return
    full_layers = runtime.layers
    ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] = sp.wrapper
    shard_runtime(runtime, sp)
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME]
        runtime.layers = full_layers
        runtime.sequence_parallel = None


def rotary_embedding(model) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    raise ValueError(f"{type(model).__name__}: no rotary embedding module (`*.rotary_emb`) found; sequence "
                     f"parallelism needs it to rebuild cos/sin for the gathered sequence")


def shard_runtime(runtime: SparseRuntime, sp: SequenceParallel | None) -> None:
    """Replace the runtime's per-layer constants (all heads, slot numbers) by this rank's slice."""
    if sp is None:
        return
    q, kv = runtime.plan.model.num_q_heads, runtime.plan.model.num_kv_heads
    runtime.layers = {i: localize_layer(layer, q, kv, sp.rank, sp.size) for i, layer in runtime.layers.items()}
    runtime.sequence_parallel = sp


def route_dense_teacher(teacher, plan, sp: SequenceParallel | None, backend: str) -> None:
    """A separate teacher model runs on the same token shards, so under SP its attention must go through
    Ulysses too: give it the `rtpurbo` attention in mode `full` (plain causal SDPA, no indexer)."""
    if sp is None:
        return
    num_kv = head_counts(teacher.config)[1]
    runtime = SparseRuntime(plan=plan, backend=backend, mode="full")
    empty = torch.zeros(0, dtype=torch.long)
    for module in attention_modules(teacher):
        runtime.layers[module.layer_idx] = LayerSparsity(module.layer_idx, empty, empty,
                                                         torch.arange(num_kv), torch.zeros(num_kv, dtype=torch.int32))
        module.rtpurbo_runtime = runtime
    runtime.sequence_parallel = sp
    teacher.set_attn_implementation(ATTENTION_NAME)
