"""Needle accuracy: scoring against a model whose greedy outputs are known, and the teacher-forcing
equivalence against Hugging Face greedy generation."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtpurbo_train.evaluation import NeedlePrompt, greedy_decode_match, greedy_exact_match, needle_summary
from rtpurbo_train.evaluation.needle_prompts import build_needle_prompts, tokenize_example
from rtpurbo_train.evaluation.passes import model_logits, score_needles
from rtpurbo_train.models import build_byte_tokenizer

from .stubs import FakeRuntime, SuccessorLM

BLIND = (209, 231, 251)  # tokens after which the stub's sparse mode predicts 0


def _prompt(kind: str, length: int, depth: float) -> NeedlePrompt:
    """Prompts whose dense/sparse outcome under SuccessorLM is known:
    ok: right in both; wrong: answer breaks the successor chain (wrong in both);
    sparse_miss: the last prompt token is blind (a_1 wrong in sparse);
    sparse_miss_mid: a_2 is blind (a_3 wrong in sparse);
    last_blind: only the last answer token is blind, whose logits are never used (right in both)."""
    start, answer = {"ok": (10, None), "wrong": (40, (50, 99, 52)), "sparse_miss": (200, None),
                     "sparse_miss_mid": (220, None), "last_blind": (240, (250, 251))}[kind]
    prompt = tuple(range(start, start + 10))
    answer = answer or tuple(range(start + 10, start + 13))
    return NeedlePrompt(prompt, answer, length, depth, task=kind)


CELLS = {  # (length, depth) -> prompt kinds, expected (dense, sparse) accuracy
    (100, 0.25): (["ok", "ok", "ok", "ok"], (1.0, 1.0)),
    (100, 0.75): (["ok", "wrong", "sparse_miss", "last_blind"], (0.75, 0.5)),
    (200, 0.25): (["sparse_miss_mid", "sparse_miss", "wrong", "wrong"], (0.5, 0.0)),
    (200, 0.75): (["wrong", "wrong", "wrong", "last_blind"], (0.25, 0.25)),
}


@pytest.mark.parametrize("scoring", ["teacher_forced", "greedy_decode"])
def test_accuracy_grid_matches_known_model(scoring):
    runtime = FakeRuntime()
    runtime.mode, runtime.indexer_kl, runtime.measure = "both", True, True  # as a trainer may leave it
    model = SuccessorLM(runtime, sparse_blind=BLIND)
    prompts = [_prompt(kind, n, d) for (n, d), (kinds, _) in CELLS.items() for kind in kinds]
    records, metrics = score_needles(model, runtime, prompts, torch.device("cpu"), scoring=scoring, progress=False)
    assert (runtime.mode, runtime.indexer_kl, runtime.measure) == ("both", True, True)

    summary = needle_summary(records, [100, 200], [0.25, 0.75], scoring)
    for (n, d), (_, (dense, sparse)) in CELLS.items():
        r, c = [0.25, 0.75].index(d), [100, 200].index(n)
        assert summary["grid"]["dense"][r][c] == dense, (n, d)
        assert summary["grid"]["sparse"][r][c] == sparse, (n, d)
    def counts(row):
        return {k: row[k] for k in ("dense", "sparse", "prompts")}

    assert counts(summary["by_length"]["100"]) == {"dense": 7 / 8, "sparse": 6 / 8, "prompts": 8}
    assert counts(summary["by_length"]["200"]) == {"dense": 3 / 8, "sparse": 1 / 8, "prompts": 8}
    assert summary["by_length"]["100"]["sparse_over_dense"] == pytest.approx(6 / 7)
    assert sum(row["prompts"] for row in summary["by_depth"].values()) == 16
    assert summary["dense"] == 10 / 16 and summary["sparse"] == 7 / 16
    assert summary["sparse_over_dense"] == pytest.approx(0.7)
    low, high = summary["ratio_ci"]
    assert low <= 0.7 <= high and low < high
    assert counts(summary["by_task"]["sparse_miss"]) == {"dense": 1.0, "sparse": 0.0, "prompts": 2}
    assert counts(summary["by_task"]["last_blind"]) == {"dense": 1.0, "sparse": 1.0, "prompts": 2}

    # sparse forwards were measured; metrics are averaged per length over its prompts
    for n in (100, 200):
        lens = [len(p.prompt_ids) + len(p.answer_ids) for p in prompts if p.length == n]
        assert metrics[n]["sparsity/mean"] == pytest.approx(sum(lens) / len(lens) / 1000.0)


def test_empty_cell_is_nan_and_bad_inputs_raise():
    runtime = FakeRuntime()
    model = SuccessorLM(runtime)
    records, _ = score_needles(model, runtime, [_prompt("ok", 100, 0.5)], torch.device("cpu"), progress=False)
    grid = needle_summary(records, [100, 200], [0.5], "teacher_forced")["grid"]["dense"]
    assert grid[0][0] == 1.0 and grid[0][1] != grid[0][1]  # NaN where no prompt
    with pytest.raises(ValueError, match="scoring"):
        score_needles(model, runtime, [], torch.device("cpu"), scoring="beam")
    with pytest.raises(ValueError, match="answer_ids is empty"):
        NeedlePrompt((1, 2), (), 10, 0.5)
    with pytest.raises(ValueError, match="do not cover"):
        greedy_exact_match(torch.zeros(2, 5), NeedlePrompt((1, 2), (3, 4), 10, 0.5))


def _tiny_llama():
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double().eval()


@torch.no_grad()
def test_teacher_forced_match_equals_hf_greedy_generation():
    """The one-forward check agrees with transformers' own greedy decoding (KV cache, token by token)."""
    model = _tiny_llama()
    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        prompt = torch.randint(0, 300, (1, 30 + 7 * trial), generator=gen)
        out = model.generate(prompt, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        greedy = tuple(out[0, prompt.shape[1]:].tolist())
        right = NeedlePrompt(tuple(prompt[0].tolist()), greedy, 64, 0.5)
        assert greedy_exact_match(model_logits(model, right.input_ids(), torch.device("cpu")), right)
        assert greedy_exact_match(model_logits(model, right.input_ids(), torch.device("cpu"), keep=7), right)
        assert greedy_decode_match(lambda x: model(x, use_cache=False).logits, right)
        k = trial % 6  # change one answer token: greedy would not produce it
        wrong_answer = list(greedy)
        wrong_answer[k] = (wrong_answer[k] + 1) % 300
        wrong = NeedlePrompt(right.prompt_ids, tuple(wrong_answer), 64, 0.5)
        assert not greedy_exact_match(model_logits(model, wrong.input_ids(), torch.device("cpu")), wrong)
        assert not greedy_decode_match(lambda x: model(x, use_cache=False).logits, wrong)


def test_needle_prompts_are_tokenised_as_prompt_then_answer():
    tok = build_byte_tokenizer()
    p = tokenize_example(tok, "The key is", " 42", 16, 0.5, "passkey")
    assert list(p.prompt_ids) == list(b"The key is") and list(p.answer_ids) == list(b" 42")
    prompts = build_needle_prompts(tok, [320, 400], [0.0, 1.0], 2, seed=3)
    assert [(p.length, p.depth) for p in prompts] == [(n, d) for n in (320, 400) for d in (0.0, 1.0) for _ in range(2)]
    for p in prompts:
        assert len(p.prompt_ids) <= p.length and p.task == "passkey"
        text = bytes(p.prompt_ids).decode()
        answer = bytes(p.answer_ids).decode()
        assert answer.strip().isdigit() and f"The pass key is{answer}." in text  # the needle holds the answer
    assert len({bytes(p.answer_ids) for p in prompts}) > 1  # prompts differ
    assert prompts == build_needle_prompts(tok, [320, 400], [0.0, 1.0], 2, seed=3)  # deterministic
    with pytest.raises(ValueError, match="needle tasks"):
        build_needle_prompts(tok, [320], [0.5], 1, seed=0, tasks=["nope"])
