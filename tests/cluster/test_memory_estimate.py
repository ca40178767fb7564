"""Memory estimate against hand-computed values for a tiny Llama config."""
import pytest
from transformers import LlamaConfig

from rtpurbo_train.memory_estimate import estimate_training_memory, format_estimate

L, H, I, V, HQ, HKV, D = 2, 32, 64, 100, 4, 2, 8


def tiny_config(tie=False):
    return LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                       num_attention_heads=HQ, num_key_value_heads=HKV, tie_word_embeddings=tie)


# by hand: embedding V*H; per layer q H*HQ*D, k and v H*HKV*D each, o HQ*D*H, MLP 3*H*I, 2 RMSNorms;
# final norm H; untied LM head V*H
LAYER_PARAMS = H * HQ * D + 2 * H * HKV * D + HQ * D * H + 3 * H * I + 2 * H  # 9280
N_UNTIED = V * H + L * LAYER_PARAMS + H + V * H  # 24992
# LoRA rank 4 on q(32->32) k(32->16) v(32->16) o(32->32) gate(32->64) up(32->64) down(64->32)
LORA_R4 = L * 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) + (32 + 64) + (64 + 32))


def estimate(**overrides):
    kwargs = dict(seq_len=128, micro_batch=2, world_size=4, sp_size=1, zero_stage=0, dtype_bytes=2)
    kwargs.update(overrides)
    config = kwargs.pop("config", tiny_config())
    return estimate_training_memory(config, **kwargs)


def test_parameter_count_matches_hand_count():
    assert N_UNTIED == 24992
    assert estimate()["params"] == N_UNTIED
    assert estimate(config=tiny_config(tie=True))["params"] == N_UNTIED - V * H


@pytest.mark.parametrize("stage, w_div, g_div, o_div", [(0, 1, 1, 1), (1, 1, 1, 4), (2, 1, 4, 4), (3, 4, 4, 4)])
def test_zero_stages_shard_what_they_should(stage, w_div, g_div, o_div):
    d = estimate(zero_stage=stage, world_size=4)
    assert d["weights"] == N_UNTIED * 2 // w_div
    assert d["gradients"] == N_UNTIED * 2 // g_div
    assert d["optimizer"] == N_UNTIED * 12 // o_div  # fp32 master + 2 fp32 moments


def test_fp32_training_has_no_separate_master_copy():
    d = estimate(dtype_bytes=4, zero_stage=0)
    assert (d["weights"], d["gradients"], d["optimizer"]) == (N_UNTIED * 4, N_UNTIED * 4, N_UNTIED * 8)


def test_offload_moves_optimizer_to_cpu():
    d = estimate(zero_stage=2, world_size=4, offload=True)
    assert d["optimizer"] == 0 and d["cpu_optimizer"] == N_UNTIED * 12 // 4


def test_lora_trains_only_adapters():
    d = estimate(lora_rank=4, zero_stage=0)
    assert d["trainable_params"] == LORA_R4 == 4096
    assert d["weights"] == (N_UNTIED + LORA_R4) * 2
    assert d["gradients"] == LORA_R4 * 2 and d["optimizer"] == LORA_R4 * 12


def test_teacher_copy_replicated_or_sharded():
    assert estimate(teacher_copy=False)["teacher"] == 0
    assert estimate(teacher_copy=True, zero_stage=2)["teacher"] == N_UNTIED * 2
    assert estimate(teacher_copy=True, zero_stage=3)["teacher"] == N_UNTIED * 2 // 4


def test_activations_and_logits_hand_values_and_sp_division():
    per_layer = 2 * (4 * H + 2 * (HQ + HKV) * D + 4 * I) + 4 * HQ  # 976 bytes per token
    tokens = 2 * 128 // 2
    d = estimate(sp_size=2, activation_checkpointing=False)
    assert d["tokens_per_gpu"] == tokens and d["data_parallel_size"] == 2
    assert d["activations"] == L * per_layer * tokens
    ckpt = estimate(sp_size=2, activation_checkpointing=True)
    assert ckpt["activations"] == (L * H * 2 + per_layer) * tokens
    assert d["logits"] == tokens * V * 4
    no_sp = estimate(sp_size=1, activation_checkpointing=False)
    assert no_sp["activations"] == 2 * d["activations"] and no_sp["logits"] == 2 * d["logits"]
    assert estimate(logits_tile_tokens=16)["logits"] == 16 * V * 4


def test_total_is_sum_and_table_lists_terms():
    d = estimate(zero_stage=3, teacher_copy=True)
    parts = ("weights", "gradients", "optimizer", "activations", "logits", "teacher")
    assert d["total"] == sum(d[k] for k in parts)
    table = format_estimate(d)
    assert "total" in table and "optimizer states" in table and f"{N_UNTIED:,}" in table


@pytest.mark.parametrize("bad, match", [
    (dict(world_size=6, sp_size=4), "divisible"), (dict(seq_len=127, sp_size=2, world_size=2), "seq_len"),
    (dict(zero_stage=4), "zero_stage"), (dict(dtype_bytes=1), "dtype_bytes"),
    (dict(offload=True, zero_stage=0), "offload"), (dict(lora_rank=0), "lora_rank"),
])
def test_bad_arguments_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        estimate(**bad)
