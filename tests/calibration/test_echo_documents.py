"""make_echo_documents: layout of the two needle copies, haystack windows, determinism, errors."""
import pytest
import torch

from rtpurbo_train.calibration import EchoDocument, make_echo_documents


def _haystack(n=1000, vocab=50, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _matching_window_starts(doc, hay, prefix_len):
    """Haystack offsets whose window equals the document outside the prefix and the needles."""
    ids = doc.input_ids
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[:prefix_len] = False
    keep[slice(*doc.needle_1)] = False
    keep[slice(*doc.needle_2)] = False
    body = ids.numel() - prefix_len
    return [s for s in range(hay.numel() - body + 1)
            if torch.equal(hay[s:s + body][keep[prefix_len:]], ids[keep])]


def test_layout_needles_and_haystack_window():
    hay = _haystack()
    prefix = [7]
    docs = make_echo_documents(hay, lengths=[100, 200], docs_per_length=3, needle_len=8, seed=3, prefix_ids=prefix)
    assert [d.length for d in docs] == [100] * 3 + [200] * 3
    for doc in docs:
        n = doc.length
        assert doc.needle_1 == (round(0.1 * n), round(0.1 * n) + 8)
        assert doc.needle_2 == (round(0.9 * n), round(0.9 * n) + 8)
        ids = doc.input_ids
        assert ids.dtype == torch.long and ids[0].item() == 7
        assert torch.equal(ids[slice(*doc.needle_1)], ids[slice(*doc.needle_2)])
        # default needle ids come from the haystack's own ids
        assert set(ids[slice(*doc.needle_1)].tolist()) <= set(hay.tolist())
        assert _matching_window_starts(doc, hay, len(prefix)), "document body is not a haystack window"


def test_second_needle_is_moved_left_to_fit():
    docs = make_echo_documents(_haystack(), lengths=[50], docs_per_length=1, needle_len=10, second_depth=1.0)
    assert docs[0].needle_2 == (40, 50)


def test_needle_id_range_and_determinism():
    hay = _haystack()
    kw = dict(lengths=[120], docs_per_length=4, needle_len=16, needle_id_range=(200, 300))
    a = make_echo_documents(hay, seed=5, **kw)
    b = make_echo_documents(hay, seed=5, **kw)
    c = make_echo_documents(hay, seed=6, **kw)
    for doc in a:
        needle = doc.input_ids[slice(*doc.needle_1)]
        assert needle.min() >= 200 and needle.max() < 300
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert not all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    # documents of one call differ from each other (fresh window and needle each time)
    assert not torch.equal(a[0].input_ids, a[1].input_ids)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=[2000], docs_per_length=1), "haystack has"),
    (dict(lengths=[30], docs_per_length=1, needle_len=16), "too short"),
    (dict(lengths=[100], docs_per_length=1, first_depth=0.9, second_depth=0.1), "first_depth"),
    (dict(lengths=[], docs_per_length=1), "lengths"),
    (dict(lengths=[100], docs_per_length=0), "docs_per_length"),
    (dict(lengths=[100], docs_per_length=1, needle_id_range=(5, 5)), "needle_id_range"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_echo_documents(_haystack(), **kwargs)


def test_empty_haystack_raises():
    with pytest.raises(ValueError, match="empty"):
        make_echo_documents([], lengths=[10], docs_per_length=1)


def test_echo_document_validates():
    ids = torch.arange(20)
    with pytest.raises(ValueError, match="must satisfy"):
        EchoDocument(ids, (10, 14), (12, 16))
    with pytest.raises(ValueError, match="different lengths"):
        EchoDocument(ids, (0, 4), (10, 15))
    with pytest.raises(ValueError, match="LongTensor"):
        EchoDocument(ids.float(), (0, 4), (10, 14))
