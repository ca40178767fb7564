"""Synthetic tasks: length, depth, answers present exactly once, determinism, user haystacks."""
import re

import pytest

from rtpurbo_train.models import build_byte_tokenizer
from rtpurbo_train.synthetic import TASKS, ContextTooShort, SyntheticConfig, TaskOptions, haystack_text, make_example, mix_example
from rtpurbo_train.synthetic import words

TOK = build_byte_tokenizer()


def n_tokens(text):
    return len(TOK(text)["input_ids"])


def test_filler_vocabularies_keep_value_words_out():
    filler = {w.lower() for lst in words.FILLER_LISTS for phrase in lst for w in phrase.split()}
    assert not filler & set(words.VALUE_WORDS)
    assert len(set(words.VALUE_WORDS)) == len(words.VALUE_WORDS) >= 50


def test_haystack_text_chars_tokens_and_seed():
    a = haystack_text(n_chars=5000, seed=1)
    assert len(a) == 5000 and a == haystack_text(n_chars=5000, seed=1)
    assert a != haystack_text(n_chars=5000, seed=2)
    assert not re.search(r"\d", a)  # digits would collide with number needles
    t = haystack_text(n_tokens=3000, tokenizer=TOK, seed=4)
    n = len(TOK(t, add_special_tokens=False)["input_ids"])
    assert 3000 - 150 <= n <= 3000  # short of the target by less than one sentence
    user = haystack_text(n_tokens=800, tokenizer=TOK, texts=["Alpha beta gamma. Delta epsilon!", "Zeta eta theta? Iota."])
    assert "Alpha beta gamma." in user and "Zeta eta theta?" in user and len(user.encode()) <= 800
    with pytest.raises(ValueError):
        haystack_text(n_chars=10, n_tokens=10, tokenizer=TOK)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1500, 6000])
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_task_length_depth_and_answer(task, length, depth):
    ex = make_example(task, TOK, context_tokens=length, depth=depth, seed=11)
    n = n_tokens(ex.prompt)
    assert ex.context_tokens == n
    assert 0.97 * length <= n <= length  # "within a few percent", never over
    assert ex.answer.startswith(" ") and not ex.prompt.endswith(" ")
    values = ex.metadata["values"]
    if task == "vartrack":
        value = ex.metadata["value"]
        assert ex.prompt.count(f"= {value}.") == 1  # the chain's root value is stated once
        chain = values
        for first, second in zip(chain, chain[1:]):  # each link "VAR second = first." appears once, in order
            assert ex.prompt.count(f"VAR {second} = {first}.") == 1
            assert ex.prompt.index(f"VAR {first} =") < ex.prompt.index(f"VAR {second} =")
        assert ex.answer == " " + " ".join(chain)
    else:
        for v in values:
            assert ex.prompt.count(v) == 1  # the answer appears exactly once in the context
        assert ex.answer == " " + ", ".join(values)

    # The queried needle sits at the requested depth: the fraction of filler tokens before it,
    # measured here independently (other needles removed from the text before counting).
    target = [nd for nd in ex.needles if nd["role"] == "target"][0]
    offset = target["char_offset"]
    assert ex.prompt[offset:].startswith(target["text"])
    prefix = ex.prompt.split("\n\n", 1)[0] + "\n\n"
    question = ex.prompt[ex.prompt.rindex("\n\n"):]
    body = ex.prompt[len(prefix) : len(ex.prompt) - len(question)]
    before = ex.prompt[len(prefix) : offset]
    for nd in ex.needles:
        body = body.replace(" " + nd["text"], "").replace(nd["text"], "")
        before = before.replace(" " + nd["text"], "").replace(nd["text"], "")
    measured = len(before.encode()) / len(body.encode())  # byte tokenizer: tokens == bytes
    sentence = 100 / len(body.encode())  # a needle goes to a sentence boundary; sentences are < 100 bytes
    assert abs(measured - depth) <= sentence
    assert abs(target["depth_measured"] - measured) < 0.01


def test_examples_are_deterministic_by_seed():
    a = make_example("multikey", TOK, context_tokens=3000, depth=0.3, seed=5)
    b = make_example("multikey", TOK, context_tokens=3000, depth=0.3, seed=5)
    c = make_example("multikey", TOK, context_tokens=3000, depth=0.3, seed=6)
    assert (a.prompt, a.answer) == (b.prompt, b.answer)
    assert a.prompt != c.prompt


def test_multikey_options_and_value_kinds():
    opts = TaskOptions(num_keys=6, key_kinds=["number"], value_kinds=["uuid"], digits=7)
    ex = make_example("multikey", TOK, context_tokens=4000, depth=0.5, seed=2, options=opts)
    assert len(ex.needles) == 6
    assert re.fullmatch(r" [0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", ex.answer)
    assert re.fullmatch(r"\d{7}", ex.metadata["key"])
    assert ex.prompt.endswith(f"for {ex.metadata['key']} mentioned in the provided text is")
    for key in ex.metadata["distractor_keys"]:
        assert ex.prompt.count(key) == 1  # distractor keys are in their needles only


def test_user_text_haystack_avoids_value_collisions():
    # A user haystack full of numbers: values must be drawn so they still occur exactly once.
    texts = [" ".join(str(10000 + i) + "." for i in range(0, 90000, 7))]
    ex = make_example("passkey", TOK, context_tokens=3000, depth=0.5, seed=0, texts=texts)
    key = ex.answer.strip()
    assert ex.prompt.count(key) == 1 and "10007." in ex.prompt


def test_too_short_context_is_an_error():
    with pytest.raises(ContextTooShort, match="too short for task multivalue"):
        make_example("multivalue", TOK, context_tokens=100, depth=0.5)


def test_mix_fills_sequences_and_separates_streams():
    cfg = SyntheticConfig(seed=3)
    docs = [mix_example(cfg, i, TOK, seq_len=1024) for i in range(40)]
    assert {d.task for d in docs} == set(cfg.tasks)  # uniform weights: 40 draws cover the 4 training tasks
    for d in docs:
        assert 0.95 * 1023 <= n_tokens(d.text) <= 1023  # + eos = the sequence
    again = mix_example(cfg, 4, TOK, seq_len=1024)
    assert again.text == docs[4].text
    assert mix_example(cfg, 4, TOK, seq_len=1024, stream="eval").text != docs[4].text
    fixed = SyntheticConfig(context_tokens=[700], depths=[0.25], tasks={"passkey": 1.0})
    ex = mix_example(fixed, 0, TOK, seq_len=1024)
    assert ex.task == "passkey" and 0.97 * 700 <= ex.context_tokens <= 700 and ex.depth == 0.25


def test_mix_falls_back_to_a_task_that_fits():
    # 300 bytes hold a passkey prompt but not four uuid needles.
    cfg = SyntheticConfig(tasks={"multikey": 5.0, "passkey": 1.0}, options=TaskOptions(value_kinds=["uuid"]))
    assert {mix_example(cfg, i, TOK, seq_len=300).task for i in range(5)} == {"passkey"}
    with pytest.raises(ContextTooShort):
        mix_example(cfg, 0, TOK, seq_len=100)


def _small_bpe_tokenizer():
    """A merge-based tokenizer trained here, so lengths are checked where token != byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([haystack_text(n_chars=200_000, seed=9)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("depth", [0.1, 0.75])
def test_lengths_with_a_bpe_tokenizer(depth):
    bpe = _small_bpe_tokenizer()
    for task in TASKS:
        for length in (600, 3000):
            ex = make_example(task, bpe, context_tokens=length, depth=depth, seed=1)
            n = len(bpe(ex.prompt)["input_ids"])
            assert ex.context_tokens == n and 0.97 * length <= n <= length, (task, length, n)
            doc = make_example(task, bpe, context_tokens=length, depth=depth, seed=1, include_answer=True)
            assert 0.97 * length <= len(bpe(doc.text)["input_ids"]) <= length
