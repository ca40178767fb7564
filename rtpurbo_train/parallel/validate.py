"""Checks that a recipe can run at `parallel.sequence_parallel_size` on a model, before loading weights.

Ulysses' all-to-all turns [T/sp tokens, all heads] into [T tokens, heads/sp]: the query heads must split
evenly, and the KV heads must either split evenly or be replicated a whole number of times (sp a
multiple of the KV heads). Every sequence is cut into sp equal shards, so seq_len must be a multiple
of sp. It need NOT be a multiple of sp * block_size: after the all-to-all each rank holds the whole
sequence, so the 64-token key/query blocks of the kernels are global blocks and never straddle a
shard boundary in any way that matters. The micro batch is fixed inside UlyssesSPAttentionHF (its
shape checks), so every training stage must use the same one.

The recipe-only rules (seq_len, micro batch) are checked when the recipe is parsed
(`config/recipe.py`); the head rules need the model's config and are checked here.
"""
from __future__ import annotations

from ..errors import UserError


def head_counts(config) -> tuple[int, int]:
    """(query heads, KV heads) of a transformers config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    q = cfg.num_attention_heads
    return q, getattr(cfg, "num_key_value_heads", None) or q


def validate_sequence_parallel(recipe, config, world_size: int) -> None:
    """Raise UserError when `recipe` cannot run with its SP size on `config` and `world_size` processes."""
    sp = recipe.parallel.sequence_parallel_size
    if sp == 1:
        return
    if world_size % sp:
        raise UserError(f"parallel.sequence_parallel_size {sp} does not divide the world size {world_size} "
                        f"(data parallel = world / SP must be whole)")
    if recipe.parallel.pad_heads:
        return  # zero KV heads make any head count splittable (parallel/head_padding.py)
    q, kv = head_counts(config)
    name = recipe.model.name_or_path
    hint = (f"valid SP sizes for it: {', '.join(map(str, valid_sp_sizes(q, kv)))}; or set parallel.pad_heads=true "
            "to append zero-weight heads")
    if q % sp:
        raise UserError(f"parallel.sequence_parallel_size {sp}: model {name} has {q} query heads, not divisible by "
                        f"{sp} (Ulysses gives each rank heads/SP query heads); {hint}")
    if kv % sp and sp % kv:
        raise UserError(f"parallel.sequence_parallel_size {sp}: model {name} has {kv} KV heads; SP must divide "
                        f"them or be a multiple of them; {hint}")


def ulysses_can_split(q: int, kv: int, sp: int) -> bool:
    """Whether SP `sp` can split q query and kv KV heads: the query heads evenly, the KV heads evenly or
    replicated a whole number of times."""
    return q % sp == 0 and (kv % sp == 0 or sp % kv == 0)


def valid_sp_sizes(q: int, kv: int) -> list[int]:
    """SP sizes a model with q query and kv KV heads can run."""
    return [s for s in range(1, q + 1) if ulysses_can_split(q, kv, s)]
