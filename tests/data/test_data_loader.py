"""Packing, padding/labels, mixture sampling, sharding, exact resume, the token cache."""
import json

import numpy as np
import pytest
import torch

from rtpurbo_train.data import DataConfig, build_train_loader, chunk_documents, iter_texts
from rtpurbo_train.data import sources as sources_module
from rtpurbo_train.errors import UserError
from rtpurbo_train.models import build_byte_tokenizer

TOK = build_byte_tokenizer()
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def doc_texts(n, seed, min_len=20, max_len=150):
    """Random-letter documents: no two chunks have the same content."""
    rng = np.random.default_rng(seed)
    return [f"doc{seed}-{i}:" + "".join(rng.choice(list("abcdefghij"), int(rng.integers(min_len, max_len)))) for i in range(n)]


def loader_for(tmp_path, sources, **kw):
    cfg = DataConfig(sources=sources, eval_fraction=0.0, min_tokens=kw.pop("min_tokens", 8), cache_dir=str(tmp_path / "cache"))
    args = dict(seq_len=64, micro_batch_size=4, seed=0)
    args.update(kw)
    return build_train_loader(cfg, TOK, **args)


def rows(batch):
    """The real tokens of each row, as tuples."""
    return [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])]


def test_chunk_documents_by_hand():
    seqs, dropped = chunk_documents(np.array([7, 8, 9]), np.array([10, 25, 3]), seq_len=8, min_tokens=3)
    # doc 7: [0,8) [8,10) -> tail of 2 < 3 dropped; doc 8: [0,8) [8,16) [16,24) [24,25) -> tail of 1 dropped;
    # doc 9: 3 tokens, its only chunk, kept.
    assert seqs.doc.tolist() == [7, 8, 8, 8, 9]
    assert seqs.start.tolist() == [0, 0, 8, 16, 0]
    assert seqs.length.tolist() == [8, 8, 8, 8, 3]
    assert dropped == 3


def test_padding_labels_and_chunks_reconstruct_documents(tmp_path):
    texts = ["short doc here", "".join(chr(ord("a") + i % 26) + str(i) for i in range(50)), "a medium sized document of some length, " * 2]
    loader = loader_for(tmp_path, [{"path": write_jsonl(tmp_path / "a.jsonl", texts)}], micro_batch_size=1, min_tokens=8)
    n_seq = loader.stats()["sequences"]
    expected_chunks = {}
    for t in texts:
        ids = list(t.encode()) + [EOS]
        chunks = [ids[i : i + 64] for i in range(0, len(ids), 64)]
        expected_chunks.update({tuple(c): t for c in chunks if len(c) >= 8 or len(ids) <= 64})
    assert n_seq == len(expected_chunks) == 1 + 3 + 2
    got = set()
    for _ in range(n_seq):
        b = next(loader)
        ids, labels, mask = b["input_ids"][0], b["labels"][0], b["attention_mask"][0]
        assert ids.dtype == labels.dtype == torch.long and ids.shape == (64,)
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == PAD).all() and (labels[n:] == -100).all()
        assert torch.equal(labels[:n], ids[:n])  # HF convention: the model shifts
        got.add(tuple(ids[:n].tolist()))
    assert got == set(expected_chunks)  # one epoch = every chunk once; no chunk mixes documents


def test_epochs_cover_everything_and_reshuffle(tmp_path):
    loader = loader_for(tmp_path, [{"path": write_jsonl(tmp_path / "a.jsonl", doc_texts(30, 1, max_len=50))}], micro_batch_size=1)
    n = loader.stats()["sequences"]
    first = [rows(next(loader))[0] for _ in range(n)]
    second = [rows(next(loader))[0] for _ in range(n)]
    assert len(set(first)) == n and set(first) == set(second) and first != second
    assert loader.stats()["epoch"] == 2.0 and loader.stats()["sources"][0]["epoch"] == 2


def test_mixture_follows_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["AAAA source a text " + str(i) for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", ["BBBB source b text " + str(i) for i in range(50)])
    loader = loader_for(tmp_path, [{"path": a, "weight": 3.0}, {"path": b, "weight": 1.0}], micro_batch_size=50)
    from_a = sum(r[:4] == tuple(b"AAAA") for _ in range(40) for r in rows(next(loader)))
    assert abs(from_a / 2000 - 0.75) < 0.03  # binomial sd ~0.01


def test_sharding_is_disjoint_and_equals_one_big_batch(tmp_path):
    src = [{"path": write_jsonl(tmp_path / "a.jsonl", doc_texts(40, 2))}, {"path": write_jsonl(tmp_path / "b.jsonl", doc_texts(25, 3)), "weight": 0.5}]
    world, batch, steps = 3, 2, 5
    ranks = [loader_for(tmp_path, src, micro_batch_size=batch, dp_rank=r, dp_world=world) for r in range(world)]
    single = loader_for(tmp_path, src, micro_batch_size=batch * world)
    n_seq = single.stats()["sequences"]
    assert steps * batch * world < n_seq  # within the first pass: no sequence may repeat
    seen = []
    for _ in range(steps):
        big = next(single)
        for r, loader in enumerate(ranks):
            part = next(loader)
            for key in part:
                assert torch.equal(part[key], big[key][r * batch : (r + 1) * batch])
            seen += rows(part)
    assert len(seen) == len(set(seen))


def test_resume_gives_the_same_next_batches(tmp_path):
    src = [{"path": write_jsonl(tmp_path / "a.jsonl", doc_texts(12, 4))}, {"path": write_jsonl(tmp_path / "b.jsonl", doc_texts(9, 5)), "weight": 2.0}]
    straight = loader_for(tmp_path, src, micro_batch_size=3, dp_rank=1, dp_world=2)
    batches = [next(straight) for _ in range(25)]  # several passes over the small sources
    for cut in (0, 7, 18):
        first = loader_for(tmp_path, src, micro_batch_size=3, dp_rank=1, dp_world=2)
        for _ in range(cut):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, as in a checkpoint
        resumed = loader_for(tmp_path, src, micro_batch_size=3, dp_rank=1, dp_world=2)
        resumed.load_state_dict(state)
        for expected in batches[cut:]:
            got = next(resumed)
            assert all(torch.equal(got[k], expected[k]) for k in expected)
    other = loader_for(tmp_path, src[:1], micro_batch_size=3)
    with pytest.raises(UserError, match="other data"):
        other.load_state_dict(state)


def test_token_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, doc_texts(10, 6))
    first = next(loader_for(tmp_path, [{"path": str(path)}]))
    real = sources_module.iter_documents
    monkeypatch.setattr("rtpurbo_train.data.corpus.iter_documents", lambda *a: pytest.fail("re-tokenised a cached source"))
    again = next(loader_for(tmp_path, [{"path": str(path)}]))
    assert torch.equal(first["input_ids"], again["input_ids"])
    loader_for(tmp_path, [{"path": str(path)}], min_tokens=30)  # new filters: still no re-tokenising
    monkeypatch.setattr("rtpurbo_train.data.corpus.iter_documents", real)
    write_jsonl(path, doc_texts(10, 7))  # new content: new fingerprint, new cache entry
    changed = next(loader_for(tmp_path, [{"path": str(path)}]))
    assert not torch.equal(first["input_ids"], changed["input_ids"])
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 2


def test_length_filters(tmp_path):
    texts = ["s" * 5, "m" * 40, "l" * 300]
    cfg = DataConfig(sources=[{"path": write_jsonl(tmp_path / "a.jsonl", texts)}], min_tokens=10, max_tokens=100, eval_fraction=0.0)
    loader = build_train_loader(cfg, TOK, seq_len=64, micro_batch_size=1, seed=0, cache_dir=tmp_path / "c")
    assert loader.stats()["skipped"] == {"too_short": 1, "too_long": 1}
    assert rows(next(loader)) == [tuple(b"m" * 40) + (EOS,)]
    assert list(iter_texts(cfg, tokenizer=TOK)) == ["m" * 40]


def test_synthetic_only_default(tmp_path):
    cfg = DataConfig(synthetic={"num_documents": 6, "seed": 1})
    assert DataConfig().synthetic is not None and DataConfig().sources == []
    loader = build_train_loader(cfg, TOK, seq_len=600, micro_batch_size=2, seed=0, cache_dir=tmp_path)
    stats = loader.stats()
    assert stats["documents"] == stats["sequences"] == 6
    batch = next(loader)
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = row[mask.bool()].tolist()
        assert ids[-1] == EOS and len(ids) >= 0.95 * 600  # a whole task (prompt + answer) per sequence
    evals = list(iter_texts(cfg, "eval", tokenizer=TOK, seq_len=600))
    assert len(evals) == 6 and not set(evals) & set(iter_texts(cfg, "train", tokenizer=TOK, seq_len=600))
    with pytest.raises(UserError, match="too short for every task"):
        build_train_loader(cfg, TOK, seq_len=100, micro_batch_size=2, seed=0, cache_dir=tmp_path)


def test_concurrent_builders_tokenise_once(tmp_path):
    """Ranks that start together share one build: the OS lock makes the second wait, then read it."""
    import threading

    from rtpurbo_train.data.token_cache import build_token_store

    calls, stores = [], []
    gate = threading.Barrier(2)

    def documents(skips):
        calls.append(1)
        yield from enumerate(["first document text", "second document text"])

    def worker():
        gate.wait()
        stores.append(build_token_store("src", {"k": 1}, documents, TOK, tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(stores) == 2
    assert all(s.n_docs == 2 and bytes(s.doc(1)[:-1].tolist()) == b"second document text" for s in stores)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_ranks_start_tokenising_at_their_own_source(tmp_path, monkeypatch):
    """Data-parallel rank r builds the uncached stores from the r-th on, so two ranks tokenise two sources at
    once; the stores still come back in the mixture's order, and every rank's loader is the same."""
    from rtpurbo_train.data import corpus

    built, real = [], corpus.build_token_store
    monkeypatch.setattr(corpus, "build_token_store", lambda name, *args: built.append(name) or real(name, *args))
    paths = [write_jsonl(tmp_path / f"{n}.jsonl", doc_texts(6, seed)) for seed, n in enumerate("abc")]
    cfg = DataConfig(sources=[{"path": p} for p in paths], eval_fraction=0.0, min_tokens=8, cache_dir=str(tmp_path / "cache"))
    loaders = {}
    for rank in (1, 0):
        built.clear()
        loaders[rank] = build_train_loader(cfg, TOK, seq_len=64, micro_batch_size=4, seed=0, dp_rank=rank, dp_world=2)
        assert built == [paths[(rank + i) % 3] for i in range(3)]
    assert loaders[0].stats()["documents"] == loaders[1].stats()["documents"] == 18
    assert [name for name, _, _ in corpus.build_stores(cfg, TOK, seq_len=64, cache_root=tmp_path / "cache",
                                                        show_progress=False, first=2)] == paths
