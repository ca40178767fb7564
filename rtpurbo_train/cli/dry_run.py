"""`launch/train.py --dry-run`: what a launch would do, without loading any weights."""
from __future__ import annotations

import os

from ..config import dump_recipe
from ..errors import UserError
from ..memory_estimate import estimate_training_memory, format_estimate
from ..trainer.engine import load_ds_config


def model_config_only(cfg):
    """The transformers config of the recipe's model, read without weights."""
    from transformers import AutoConfig

    from ..models import REGISTERED_MODELS, TINY_FAMILIES, build_byte_tokenizer
    from ..models.smollm2 import ensure_smollm2_folder
    from ..models.tiny import tiny_config

    name = cfg.name_or_path
    if name in TINY_FAMILIES:
        tok = build_byte_tokenizer()
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tiny_config(name, len(tok), special, cfg.overrides)
    source = str(ensure_smollm2_folder()) if name == "smollm2-135m" else name
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model {name!r}: no local config ({', '.join(REGISTERED_MODELS)} are built in): "
                        f"{str(err).splitlines()[0]}") from None
    for key, value in cfg.overrides.items():
        setattr(config, key, value)
    return config


def dry_run(recipe) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sp = recipe.parallel.sequence_parallel_size
    if world % sp:
        raise UserError(f"world size {world} is not a multiple of parallel.sequence_parallel_size {sp}")
    ds = load_ds_config(recipe.deepspeed.config)
    zero = int(ds.get("zero_optimization", {}).get("stage", 0))
    offload = bool(ds.get("zero_optimization", {}).get("offload_optimizer"))
    from ..pipeline.run import check_data_sources
    check_data_sources(recipe)
    print(dump_recipe(recipe))
    print(f"world size {world}: data parallel {world // sp} x sequence parallel {sp}; ZeRO stage {zero}"
          f"{' with CPU offload' if offload else ''}")
    config = model_config_only(recipe.model)
    from ..parallel import validate_sequence_parallel
    validate_sequence_parallel(recipe, config, world)  # head counts vs SP: the same check a launch makes
    for stage in recipe.stages:
        if stage.type not in ("indexer_warmup", "sparse_train"):
            continue
        lora = getattr(stage, "lora", None)
        est = estimate_training_memory(
            config, seq_len=stage.seq_len, micro_batch=stage.micro_batch_size, world_size=world, sp_size=sp,
            zero_stage=zero, dtype_bytes=2, lora_rank=lora.rank if lora else None,
            teacher_copy=stage.type == "sparse_train" and stage.losses.distill > 0 and lora is None,
            activation_checkpointing=recipe.deepspeed.activation_checkpointing, offload=offload)
        print(f"\n{stage.type} (seq_len {stage.seq_len}, micro batch {stage.micro_batch_size}), per GPU, bf16:")
        print(format_estimate(est))
