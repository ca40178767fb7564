"""Per-GPU memory estimate of a training run, from the model config alone (no weights are loaded).

`launch/train.py --dry-run` prints it; the numbers are a planning aid (which ZeRO stage, SP size,
micro batch fit on a GPU), not a promise. Terms that depend on the implementation (CUDA context, NCCL
buffers, allocator fragmentation, DeepSpeed bucket sizes, temporary all-gather buffers of ZeRO-3)
are left out; keep 10-20% headroom over `total`.
"""
from __future__ import annotations

import copy

# Adam-family optimizer bytes per trainable parameter. Mixed precision (bf16/fp16 weights): fp32
# master copy + fp32 first and second moments = 4 + 4 + 4. Full fp32 training: the weights are the
# master copy, so only the two moments = 4 + 4.
ADAM_BYTES_MIXED = 12
ADAM_BYTES_FP32 = 8
LOGITS_BYTES = 4  # the loss upcasts logits to fp32
LSE_BYTES = 4  # flash-style attention saves one fp32 log-sum-exp per (token, query head)


def count_parameters(config, lora_rank: int | None = None) -> tuple[int, int]:
    """`(all_params, lora_params)` of the causal LM that `config` describes.

    The model is built on the `meta` device (shapes only, no memory, no weights), so tied
    embeddings, biases and q/k norms are counted exactly as transformers builds them. LoRA adapters
    of rank r on every `nn.Linear` of the decoder (q, k, v, o, gate, up, down; not the LM head) add
    r * (in_features + out_features) each.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except Exception as err:  # noqa: BLE001 - any failure means the config names no known model
        raise ValueError(f"cannot build a causal LM from this config to count its parameters: {err}") from err
    all_params = sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once
    lora_params = 0
    if lora_rank is not None:
        head = model.get_output_embeddings()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                lora_params += lora_rank * (module.in_features + module.out_features)
    return all_params, lora_params


def decoder_shape(config) -> dict[str, int]:
    """Layer count, widths and head layout read from a transformers config (clear error if absent)."""
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size",
                           "num_attention_heads") if getattr(config, k, None) is None]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}; a decoder-only transformers config is needed")
    heads = config.num_attention_heads
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
        "q_heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
    }


def layer_activation_bytes_per_token(shape: dict[str, int], dtype_bytes: int) -> int:
    """Bytes one decoder layer saves for backward, per token, without checkpointing.

    Llama-style layer (RMSNorm, GQA attention with a flash/block-sparse kernel, SwiGLU MLP), counting
    the tensors autograd keeps: the input of each RMSNorm (2 x h) and of each projection group (the
    normed x for q/k/v and for gate/up: 2 x h), post-RoPE q, k, v ((Hq + 2 Hkv) D), the attention
    output that o_proj also reads (Hq D), the MLP's gate output, silu(gate), up output and the
    down_proj input (4 x i), all in the training dtype, plus the kernel's fp32 log-sum-exp (Hq x 4 B):

        dtype_bytes * (4 h + 2 (Hq + Hkv) D + 4 i) + 4 Hq

    The attention kernel never stores T x T scores. Not counted: RMSNorm's per-token fp32 rstd, the
    indexer's pre-RoPE q/k (RTPurbo retrieval heads, <= 15% of heads), LoRA's r-wide intermediates.
    """
    h, i, d = shape["hidden"], shape["intermediate"], shape["head_dim"]
    hq, hkv = shape["q_heads"], shape["kv_heads"]
    return dtype_bytes * (4 * h + 2 * (hq + hkv) * d + 4 * i) + LSE_BYTES * hq


def estimate_training_memory(config, *, seq_len: int, micro_batch: int, world_size: int, sp_size: int,
                             zero_stage: int, dtype_bytes: int, lora_rank: int | None = None,
                             teacher_copy: bool = False, activation_checkpointing: bool = True,
                             offload: bool = False, logits_tile_tokens: int | None = None) -> dict:
    """Per-GPU bytes of one training run, term by term.

    Symbols: N all model parameters, P trainable parameters (N, or the LoRA adapters' count when
    `lora_rank` is set), e = `dtype_bytes` (2 for bf16/fp16, 4 for fp32), W = `world_size` GPUs,
    L layers, h hidden size, V vocabulary, t = micro_batch * seq_len / sp_size tokens per GPU.

    ZeRO partitions over all W ranks: DeepSpeed's Ulysses SP averages gradients over the
    sequence-and-data-parallel group, so SP ranks hold shards like data-parallel ranks do.
    Sharded terms are ceil(x / W) (DeepSpeed pads partitions).

    - `weights`: the model in the training dtype, (N + LoRA adapters) * e; ZeRO-3 shards it (/ W).
      Frozen base weights are sharded by ZeRO-3 too.
    - `gradients`: one gradient per trainable parameter in the training dtype, P * e;
      sharded (/ W) from ZeRO-2 on.
    - `optimizer`: Adam states per trainable parameter, P * 12 with e = 2 (fp32 master weights +
      fp32 first and second moments) or P * 8 with e = 4 (the weights are their own master copy);
      sharded (/ W) from ZeRO-1 on. With `offload` they live in CPU memory: the GPU term is 0 and
      `cpu_optimizer` holds the bytes (per rank; a node holds GPUs-per-node times that).
    - `activations`: saved tensors for backward, micro_batch * seq_len / sp_size tokens per GPU
      (Ulysses splits the sequence outside attention and the heads inside it, so each rank holds 1/sp
      of every activation). With `a` = `layer_activation_bytes_per_token` (see its docstring):
      without checkpointing L * a * t; with checkpointing each layer keeps only its input, h * e per
      token, and the layer being recomputed in backward holds a full layer: (L * h * e + a) * t.
    - `logits`: the fp32 logits the loss reads, t * V * 4; with `logits_tile_tokens` (a tiled
      logits/loss path) only min(tile, t) * V * 4 exist at once. Their gradient reuses the buffer in
      fused cross-entropy; an unfused loss roughly doubles this term.
    - `teacher`: a frozen dense copy of the weights for self-distillation, N * e (/ W under ZeRO-3,
      which shards it like the student). With LoRA the teacher is the same model with adapters
      disabled and costs nothing: leave `teacher_copy` False.
    - `total`: the sum of the GPU terms above.

    Also returned: `params` (N), `trainable_params` (P), `tokens_per_gpu` (t),
    `data_parallel_size` (W / sp_size), `zero_shards` (W).
    """
    _check_arguments(seq_len=seq_len, micro_batch=micro_batch, world_size=world_size, sp_size=sp_size,
                     zero_stage=zero_stage, dtype_bytes=dtype_bytes, lora_rank=lora_rank, offload=offload,
                     logits_tile_tokens=logits_tile_tokens)
    shape = decoder_shape(config)
    all_params, lora_params = count_parameters(config, lora_rank)
    trainable = lora_params if lora_rank is not None else all_params

    def shard(nbytes: int, sharded: bool) -> int:
        return -(-nbytes // world_size) if sharded else nbytes

    weights = shard((all_params + lora_params) * dtype_bytes, zero_stage >= 3)
    gradients = shard(trainable * dtype_bytes, zero_stage >= 2)
    adam_bytes = ADAM_BYTES_MIXED if dtype_bytes < 4 else ADAM_BYTES_FP32
    optimizer_states = shard(trainable * adam_bytes, zero_stage >= 1)
    optimizer, cpu_optimizer = (0, optimizer_states) if offload else (optimizer_states, 0)

    tokens = micro_batch * seq_len // sp_size
    per_layer = layer_activation_bytes_per_token(shape, dtype_bytes)
    if activation_checkpointing:
        activations = (shape["layers"] * shape["hidden"] * dtype_bytes + per_layer) * tokens
    else:
        activations = shape["layers"] * per_layer * tokens
    logit_tokens = tokens if logits_tile_tokens is None else min(logits_tile_tokens, tokens)
    logits = logit_tokens * shape["vocab"] * LOGITS_BYTES
    teacher = shard(all_params * dtype_bytes, zero_stage >= 3) if teacher_copy else 0

    result = {"weights": weights, "gradients": gradients, "optimizer": optimizer,
              "activations": activations, "logits": logits, "teacher": teacher}
    result["total"] = sum(result.values())
    result.update(cpu_optimizer=cpu_optimizer, params=all_params, trainable_params=trainable,
                  tokens_per_gpu=tokens, data_parallel_size=world_size // sp_size, zero_shards=world_size)
    return result


def _check_arguments(*, seq_len, micro_batch, world_size, sp_size, zero_stage, dtype_bytes, lora_rank,
                     offload, logits_tile_tokens) -> None:
    for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("world_size", world_size),
                        ("sp_size", sp_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if world_size % sp_size:
        raise ValueError(f"world_size {world_size} is not divisible by sp_size {sp_size}")
    if seq_len % sp_size:
        raise ValueError(f"seq_len {seq_len} is not divisible by sp_size {sp_size}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {dtype_bytes!r}")
    if lora_rank is not None and (not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive integer or None, got {lora_rank!r}")
    if offload and zero_stage == 0:
        raise ValueError("offload needs ZeRO stage >= 1 (DeepSpeed offloads the partitioned optimizer)")
    if logits_tile_tokens is not None and (not isinstance(logits_tile_tokens, int) or logits_tile_tokens < 1):
        raise ValueError(f"logits_tile_tokens must be a positive integer or None, got {logits_tile_tokens!r}")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:10.2f} GiB"


def format_estimate(d: dict) -> str:
    """A small table of an `estimate_training_memory` result (GiB per GPU)."""
    rows = [("weights", "model weights"), ("gradients", "gradients"), ("optimizer", "optimizer states"),
            ("activations", "activations"), ("logits", "fp32 logits"), ("teacher", "teacher copy")]
    lines = [f"{'per-GPU memory estimate':<26}{'':>14}"]
    lines += [f"  {label:<24}{_gib(d[key])}" for key, label in rows]
    lines.append(f"  {'-' * 38}")
    lines.append(f"  {'total':<24}{_gib(d['total'])}")
    if d.get("cpu_optimizer"):
        lines.append(f"  {'CPU (offloaded optimizer)':<24}{_gib(d['cpu_optimizer'])}  per rank")
    lines.append(f"  params {d['params']:,} (trainable {d['trainable_params']:,}), "
                 f"{d['tokens_per_gpu']:,} tokens/GPU, DP {d['data_parallel_size']}, "
                 f"ZeRO shards {d['zero_shards']}")
    return "\n".join(lines)
