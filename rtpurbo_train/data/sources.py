"""Reading a data source through `datasets`: resolve the path, check the text field, and yield the
clean documents with their record index (skips counted by reason, see `records.py`).

Reading paths (all through `datasets`):
- jsonl: the `text` builder reads lines (undecodable bytes replaced), each line is parsed here, so a
  bad line (invalid JSON, invalid UTF-8, a non-string value) skips that record instead of failing
  the whole file as the `json` builder would;
- json (one document array / object): the `json` builder;
- parquet / arrow / csv: their builders, streamed (no copy into the HF cache); csv with
  undecodable bytes replaced;
- txt folder or file: the `text` builder with one document per file;
- `save_to_disk` folder: `datasets.load_from_disk`.
"""
from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import UserError
from ..paths import REPO_ROOT
from .config import SourceConfig
from .records import SkipCounter, clean_text

_BY_SUFFIX = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl",
    ".json": "json", ".json.gz": "json",
    ".parquet": "parquet", ".arrow": "arrow",
    ".csv": "csv", ".tsv": "csv",
    ".txt": "text",
}
_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
FIELD_PROBE = 1000  # jsonl records inspected before a field that never appears is an error


def _suffix_kind(path: Path) -> Optional[str]:
    name = path.name.lower()
    for suffix in sorted(_BY_SUFFIX, key=len, reverse=True):
        if name.endswith(suffix):
            return _BY_SUFFIX[suffix]
    return None


def _is_disk_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _DISK_MARKERS)


@dataclass
class ResolvedSource:
    """A source config with its format and files decided."""

    config: SourceConfig
    kind: str
    files: list[Path]  # the data files (for `disk`: every file of the folder, for the fingerprint)
    root: Path  # the folder (`disk`) or the path as given

    @property
    def name(self) -> str:
        return self.config.path

    def fingerprint(self) -> str:
        """Changes when a file is added, removed, resized or rewritten, or the field changes."""
        h = hashlib.sha256(json.dumps([self.kind, self.config.text_field]).encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]



def _missing(raw: str, what: str) -> UserError:
    """The error for a path that is not there, with the fix when it is the public corpus (`make data`)."""
    from ..corpora import PUBLIC_CORPUS_DIR

    where = " (looked in . and in the repository)" if not Path(raw).expanduser().is_absolute() else ""
    message = f"{what}: {raw}{where}"
    candidate = Path(raw).expanduser()
    candidate = candidate if candidate.is_absolute() else REPO_ROOT / candidate
    try:
        candidate.resolve().relative_to(PUBLIC_CORPUS_DIR.resolve())
        message += "; it is part of the public corpus: build it with `make data` (python -m rtpurbo_train.corpora)"
    except ValueError:
        pass
    return UserError(message)


def _locate(raw: str) -> Path:
    """A relative path is looked up in the working directory, then in the repository (like deepspeed.config),
    so the shipped recipes' `data/public/...` sources work from anywhere."""
    path = Path(raw).expanduser()
    if path.is_absolute() or path.exists():
        return path
    in_repo = REPO_ROOT / path
    if any(ch in raw for ch in "*?["):  # a pattern: the repository only when it matches there and not here
        here, there = glob.glob(str(path), recursive=True), glob.glob(str(in_repo), recursive=True)
        return in_repo if there and not here else path
    return in_repo if in_repo.exists() else path


def resolve_source(cfg: SourceConfig) -> ResolvedSource:
    """Decide format and files; a missing path or unusable folder is a UserError naming it."""
    raw = cfg.path
    path = _locate(raw)
    if any(ch in raw for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise _missing(raw, "data source: no files match the pattern")
        kinds = {cfg.format if cfg.format != "auto" else _suffix_kind(f) for f in files}
        if None in kinds or len(kinds) != 1:
            raise UserError(f"data source {raw}: the matched files must share one known format (found {sorted(map(str, kinds))})")
        return ResolvedSource(cfg, kinds.pop(), files, path)
    if not path.exists():
        raise _missing(raw, "data file not found")
    if path.is_dir():
        if cfg.format == "disk" or (cfg.format == "auto" and _is_disk_folder(path)):
            return ResolvedSource(cfg, "disk", sorted(p for p in path.rglob("*") if p.is_file()), path)
        if cfg.format not in ("auto", "text"):
            raise UserError(f"data source {raw}: format {cfg.format} needs a file or glob, not a folder")
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"data source {raw}: the folder holds no .txt files and is not a datasets save_to_disk folder")
        return ResolvedSource(cfg, "text", files, path)
    kind = cfg.format if cfg.format != "auto" else _suffix_kind(path)
    if kind is None:
        raise UserError(f"data source {raw}: unknown file type (use .jsonl .json .parquet .arrow .csv .txt, or set format)")
    return ResolvedSource(cfg, kind, [path], path)


def _field_error(src: ResolvedSource, available) -> UserError:
    fields = ", ".join(sorted(map(str, available))) or "(none)"
    return UserError(f"data source {src.name}: no field {src.config.text_field!r}; available fields: {fields}")


def _files(src: ResolvedSource) -> list[str]:
    return [str(f) for f in src.files]


def _typed_dataset(src: ResolvedSource):
    """The `datasets` object for a typed format (not jsonl), its text field checked."""
    import datasets

    field = src.config.text_field
    if src.kind == "disk":
        ds = datasets.load_from_disk(str(src.root))
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
            if split is None:
                raise UserError(f"data source {src.name}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
            ds = ds[split]
    elif src.kind == "json":
        # Not streamed: streaming a JSON array with mixed value types yields JSON-encoded strings.
        ds = datasets.load_dataset("json", data_files=_files(src), split="train")
    elif src.kind == "text":
        if field != "text":
            raise UserError(f"data source {src.name}: .txt files have the single field 'text' (text_field is {field!r})")
        ds = datasets.load_dataset("text", data_files=_files(src), split="train", streaming=True, sample_by="document", encoding_errors="replace")
    elif src.kind == "csv":
        sep = "\t" if all(f.suffix.lower() == ".tsv" for f in src.files) else ","
        ds = datasets.load_dataset("csv", data_files=_files(src), split="train", streaming=True, sep=sep, encoding_errors="replace")
    else:  # parquet, arrow
        ds = datasets.load_dataset(src.kind, data_files=_files(src), split="train", streaming=True)
    features = ds.features
    if features is not None and field not in features:
        raise _field_error(src, features)
    return ds


def _typed_values(src: ResolvedSource) -> Iterator[tuple[Any, bool]]:
    """(value, has_field) per record."""
    field = src.config.text_field
    ds = _typed_dataset(src)
    if ds.features is None:  # only when the builder could not infer a schema up front
        seen = False
        for i, row in enumerate(ds):
            seen = seen or field in row
            if not seen and i + 1 >= FIELD_PROBE:
                raise _field_error(src, row)
            yield row.get(field), field in row
        return
    for batch in ds.select_columns([field]).iter(batch_size=1024):
        for value in batch[field]:
            yield value, True


def _jsonl_values(src: ResolvedSource) -> Iterator[tuple[Any, bool]]:
    """(value, has_field) per non-blank line; `_INVALID_JSON` for a line that is not an object."""
    import datasets

    field = src.config.text_field
    lines = datasets.load_dataset("text", data_files=_files(src), split="train", streaming=True, encoding_errors="replace")
    seen, keys, records = False, set(), 0
    for row in lines:
        line = row["text"]
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            yield _INVALID_JSON, False
            continue
        if not isinstance(record, dict):
            yield _INVALID_JSON, False
            continue
        records += 1
        if not seen:
            seen = field in record
            keys.update(record)
            if not seen and records >= FIELD_PROBE:
                raise _field_error(src, keys)
        yield record.get(field), field in record
    if records and not seen:
        raise _field_error(src, keys)


_INVALID_JSON = object()


def iter_documents(src: ResolvedSource, skips: SkipCounter) -> Iterator[tuple[int, str]]:
    """(record index, text) of each clean document; skipped records are counted in `skips`.

    The record index counts every record (skipped ones too), so it identifies a record stably."""
    values = _jsonl_values(src) if src.kind == "jsonl" else _typed_values(src)
    try:
        for index, (value, has_field) in enumerate(values):
            if value is _INVALID_JSON:
                skips["invalid_json"] += 1
                continue
            if not has_field:
                skips["missing_field"] += 1
                continue
            text, reason = clean_text(value)
            if reason:
                skips[reason] += 1
                continue
            yield index, text
    except UserError:
        raise
    except Exception as err:  # a corrupt or unreadable file: name it, in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"cannot read data source {src.name}: {type(err).__name__}: {first}") from err
