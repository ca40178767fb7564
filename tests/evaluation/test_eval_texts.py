"""Which text the evaluation reads: held-out documents of data.sources (disjoint from training, every
source represented) for perplexity and, by the stage's `haystack` switch, for the needle haystacks;
the RULER-style tasks beside the passkey; the report naming the text."""
import json

import pytest

from rtpurbo_train.config.stages import EvaluateStage
from rtpurbo_train.data import DataConfig, iter_texts
from rtpurbo_train.data.split import is_held_out
from rtpurbo_train.errors import UserError
from rtpurbo_train.evaluation import evaluate
from rtpurbo_train.evaluation.needle_prompts import build_needle_prompts
from rtpurbo_train.models import build_byte_tokenizer
from rtpurbo_train.pipeline.stage_evaluate import heldout_documents, select_texts
from rtpurbo_train.synthetic import words

from .test_evaluate_end_to_end import _tiny_sparse_model

TOK = build_byte_tokenizer()


def _doc(tag: str, i: int) -> str:
    """A document whose every sentence carries its own marker word (lowercase letters only)."""
    marker = "".join(chr(ord("a") + int(c)) for c in f"{i:03d}")
    return " ".join(f"The {tag}{marker} report describes item {tag}{marker} in detail." for _ in range(12))


def _data(tmp_path, eval_fraction=0.3, **kw):
    paths = []
    for tag in ("alpha", "beta"):
        path = tmp_path / f"{tag}.jsonl"
        path.write_text("".join(json.dumps({"text": _doc(tag, i)}) + "\n" for i in range(20)))
        paths.append(str(path))
    return DataConfig(sources=[{"path": p} for p in paths], eval_fraction=eval_fraction, min_tokens=16, **kw), paths


def _expected_heldout(paths):
    return {path: [_doc(tag, i) for i in range(20) if is_held_out(path, i, 0.3)]
            for tag, path in zip(("alpha", "beta"), paths)}


def test_heldout_documents_are_the_holdout_of_every_source_in_turn(tmp_path):
    data, paths = _data(tmp_path)
    texts, counts = heldout_documents(data, TOK)
    expected = _expected_heldout(paths)
    assert counts == {p: len(v) for p, v in expected.items()} and all(counts.values())
    assert sorted(texts) == sorted(expected[paths[0]] + expected[paths[1]])
    assert texts[0] == expected[paths[0]][0] and texts[1] == expected[paths[1]][0]  # round robin
    train = set(iter_texts(data, "train"))
    assert train and not train & set(texts)  # disjoint from the training documents
    assert heldout_documents(data, TOK, limit=3)[0] == texts[:3]


def test_haystack_switch(tmp_path):
    data, paths = _data(tmp_path)
    heldout = select_texts(data, EvaluateStage(haystack="heldout"), TOK)
    auto = select_texts(data, EvaluateStage(), TOK)
    generated = select_texts(data, EvaluateStage(haystack="generated"), TOK)
    assert heldout.haystack == heldout.perplexity and auto.haystack == heldout.haystack
    assert generated.haystack is None and generated.perplexity == heldout.perplexity
    for label in (heldout.perplexity_label, heldout.haystack_label):
        assert paths[0] in label and paths[1] in label and "held-out" in label and "0.3" in label
    assert generated.haystack_label == "generated filler sentences"

    train_markers = {w.strip(".") for t in iter_texts(data, "train") for w in t.split() if w.startswith(("alpha", "beta"))}
    held_markers = {w.strip(".") for t in heldout.perplexity for w in t.split() if w.startswith(("alpha", "beta"))}
    for texts, from_heldout in ((heldout.haystack, True), (generated.haystack, False)):
        prompts = build_needle_prompts(TOK, [900, 1100], [0.3, 0.7], 2, seed=0,
                                       tasks=("passkey", "single_needle", "multikey", "multivalue"),
                                       haystack_texts=texts)
        for p in prompts:
            text = TOK.decode(p.prompt_ids, skip_special_tokens=True)
            found = {w.strip(".") for w in text.split() if w.startswith(("alpha", "beta"))}
            assert not found & train_markers  # never training text
            if from_heldout:
                assert found and found <= held_markers
            else:
                assert not found and any(name in text for name in words.NAMES + words.NOUNS)


def test_no_heldout_text_is_one_clear_error(tmp_path):
    data, _ = _data(tmp_path, eval_fraction=0.0)
    with pytest.raises(UserError, match="no held-out documents.*eval_fraction"):
        select_texts(data, EvaluateStage(), TOK)
    synthetic_only = DataConfig()
    with pytest.raises(UserError, match="haystack is 'heldout' but the recipe has no data.sources"):
        select_texts(synthetic_only, EvaluateStage(haystack="heldout"), TOK)
    alone = select_texts(synthetic_only, EvaluateStage(perplexity_len=256), TOK)
    assert alone.haystack is None and "synthetic" in alone.perplexity_label and alone.perplexity


def test_tasks_rotate_over_the_grid():
    tasks = ("passkey", "single_needle", "multikey", "multivalue")
    prompts = build_needle_prompts(TOK, [900], [0.2, 0.8], 2, seed=1, tasks=tasks)
    assert [p.task for p in prompts] == list(tasks)  # 2 cells x 2 samples: every task once
    full = build_needle_prompts(TOK, [900], [0.5], 4, seed=1, tasks=tasks)
    assert [p.task for p in full] == list(tasks)
    single = TOK.decode(full[1].prompt_ids, skip_special_tokens=True)
    assert single.count("One of the special magic") == 1 and "memorize it." in single
    multikey = TOK.decode(full[2].prompt_ids, skip_special_tokens=True)
    assert multikey.count("One of the special magic") == 4


def test_report_names_the_text(tmp_path):
    model, tok, runtime, plan = _tiny_sparse_model(window=4096, top_p=1.0)
    data, paths = _data(tmp_path)
    texts = select_texts(data, EvaluateStage(), tok)
    results = evaluate(model, tok, runtime, plan, lengths=[600], depths=[0.5], samples_per_cell=2,
                       tasks=("passkey", "single_needle"), perplexity_texts=texts.perplexity, perplexity_len=256,
                       perplexity_docs=2, timing_runs=1, out_dir=tmp_path / "eval", haystack_texts=texts.haystack,
                       text_sources={"perplexity": texts.perplexity_label, "haystack": texts.haystack_label},
                       progress=False)
    assert results["config"]["text"]["haystack"] == texts.haystack_label
    assert results["perplexity"]["docs"] == 2
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"Text: {texts.perplexity_label}." in report and f"Haystack: {texts.haystack_label}." in report
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["config"]["text"]["perplexity"] == texts.perplexity_label
