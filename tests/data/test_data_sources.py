"""Data sources: every file kind through `datasets`, bad records skipped and counted, clear errors."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rtpurbo_train.data import DataConfig, build_train_loader, iter_texts
from rtpurbo_train.data.records import SkipCounter
from rtpurbo_train.data.sources import iter_documents, resolve_source
from rtpurbo_train.data.config import SourceConfig
from rtpurbo_train.errors import UserError
from rtpurbo_train.models import build_byte_tokenizer

TOK = build_byte_tokenizer()
GOOD = [f"Document number {i} talks about rivers and hills. " * (1 + i % 3) for i in range(6)]


def read(path, **kw):
    skips = SkipCounter()
    docs = [t for _, t in iter_documents(resolve_source(SourceConfig(path=str(path), **kw)), skips)]
    return docs, skips.as_dict()


def write_bad_jsonl(path):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(GOOD)]
    lines += [
        json.dumps({"text": 12345}),  # wrong_type
        json.dumps({"text": ["a", "list"]}),  # wrong_type
        json.dumps({"text": {"nested": "dict"}}),  # wrong_type
        json.dumps({"text": ""}),  # empty
        json.dumps({"text": "   \n\t "}),  # empty
        json.dumps({"text": None}),  # empty
        json.dumps({"id": 99}),  # missing_field
        "{this is not json",  # invalid_json
        "[1, 2, 3]",  # invalid_json (not an object)
        json.dumps({"text": "tiny"}),  # too_short once tokenised (5 bytes + eos < 16)
        "",  # blank line: not a record
    ]
    data = "\n".join(lines).encode() + b'\n{"text": "broken \xff\xfe bytes here and more text"}\n'  # invalid_utf8
    path.write_bytes(data)
    return path


def test_jsonl_bad_records_are_skipped_and_counted(tmp_path):
    path = write_bad_jsonl(tmp_path / "bad.jsonl")
    docs, skips = read(path)
    assert docs == GOOD + ["tiny"]
    assert skips == {"empty": 3, "invalid_json": 2, "invalid_utf8": 1, "missing_field": 1, "wrong_type": 3}
    cfg = DataConfig(sources=[{"path": str(path)}], eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    loader = build_train_loader(cfg, TOK, seq_len=64, micro_batch_size=2, seed=0)
    stats = loader.stats()
    assert stats["skipped"] == {**skips, "too_short": 1}
    assert stats["documents"] == len(GOOD)


def test_typed_formats_agree(tmp_path):
    texts = GOOD + [None, ""]
    pq.write_table(pa.table({"text": texts, "n": list(range(8))}), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_bytes(b"text,n\n" + b"".join(f'"{t}",{i}\n'.encode() for i, t in enumerate(GOOD)) + b',7\n"bad \xff row",8\n')
    (tmp_path / "d.json").write_text(json.dumps([{"text": t} for t in GOOD] + [{"text": 3}]))
    import datasets

    ds = datasets.Dataset.from_dict({"text": GOOD, "n": list(range(6))})
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "diskdict"))
    arrow_file = next((tmp_path / "disk").glob("*.arrow"))

    assert read(tmp_path / "d.parquet") == (GOOD, {"empty": 2})
    assert read(tmp_path / "d.csv") == (GOOD, {"empty": 1, "invalid_utf8": 1})
    assert read(tmp_path / "d.json") == (GOOD, {"wrong_type": 1})
    assert read(tmp_path / "disk") == (GOOD, {})
    assert read(tmp_path / "diskdict") == (GOOD, {})  # the train split
    assert read(arrow_file) == (GOOD, {})
    numbers, skips = read(tmp_path / "d.parquet", text_field="n")  # an int column: every record is the wrong type
    assert numbers == [] and skips == {"wrong_type": 8}


def test_txt_folder_and_globs(tmp_path):
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    for i, t in enumerate(GOOD[:3]):
        (folder / f"{i}.txt").write_text(t + "\nSecond line of the file.")
    (folder / "sub" / "z.txt").write_text(GOOD[3])
    (folder / "empty.txt").write_text("")
    (folder / "bad.txt").write_bytes(b"caf\xe9 latin-1 text")
    (folder / "notes.md").write_text("ignored: not a .txt file")
    docs, skips = read(folder)
    assert sorted(docs) == sorted([t + "\nSecond line of the file." for t in GOOD[:3]] + [GOOD[3]])
    assert skips == {"empty": 1, "invalid_utf8": 1}

    for k in range(2):
        (tmp_path / f"part{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in GOOD[3 * k : 3 * k + 3]))
    assert read(tmp_path / "part*.jsonl") == (GOOD, {})


def test_errors_name_the_problem(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "a b c", "id": 1}) + "\n")
    with pytest.raises(UserError, match=r"no field 'text'; available fields: content, id"):
        read(path)
    pq.write_table(pa.table({"body": ["x"], "meta": [1]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"no field 'text'; available fields: body, meta"):
        read(tmp_path / "p.parquet")
    with pytest.raises(UserError, match="data file not found: .*missing.jsonl"):
        read(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="no files match"):
        read(tmp_path / "nothing*.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        read(tmp_path / "empty_dir")
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(UserError, match="cannot read data source .*junk.parquet"):
        read(tmp_path / "junk.parquet")
    all_bad = tmp_path / "allbad.jsonl"
    all_bad.write_text(json.dumps({"text": 1}) + "\n")
    cfg = DataConfig(sources=[{"path": str(all_bad)}], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="no usable training documents.*wrong_type"):
        build_train_loader(cfg, TOK, seq_len=64, micro_batch_size=1, seed=0)


def test_iter_texts_split_is_disjoint_and_complete(tmp_path):
    texts = [f"held out or not, document {i}, with some words." for i in range(200)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig(sources=[{"path": str(path)}], eval_fraction=0.25)
    train, held = list(iter_texts(cfg, "train")), list(iter_texts(cfg, "eval"))
    assert sorted(train + held) == sorted(texts) and not set(train) & set(held)
    assert 25 <= len(held) <= 75
    assert held == list(iter_texts(cfg, "eval"))  # stable
    # The training loader never sees held-out documents.
    loader = build_train_loader(cfg, TOK, seq_len=64, micro_batch_size=8, seed=0, cache_dir=tmp_path / "cache")
    seen = set()
    for _ in range(len(train) // 8 + 2):
        batch = next(loader)
        for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seen.add(TOK.decode(row[mask.bool()][:-1]))  # drop the eos
    assert seen <= set(train) and len(seen) == len(train)
    assert loader.stats()["eval_documents"] == len(held)
