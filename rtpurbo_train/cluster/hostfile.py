"""DeepSpeed hostfiles from Slurm allocations.

DeepSpeed's launcher reads a hostfile of lines `HOSTNAME slots=N` (N = GPUs on that host, `#` starts
a comment). Slurm describes an allocation as a compressed nodelist (`gpu[01-03,07],login5`);
`scontrol show hostnames "$SLURM_JOB_NODELIST"` prints one expanded host name per line. These helpers
turn either form into a hostfile, and read a hostfile back (the dry run uses it for the world size).
"""
from __future__ import annotations

import re

HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots\s*=\s*(\d+)$")


class HostfileError(ValueError):
    """A nodelist or hostfile that cannot be used as given."""


def hosts_from_scontrol(text: str) -> list[str]:
    """Host names from `scontrol show hostnames` output (one per line; blank lines ignored)."""
    hosts = [line.strip() for line in text.splitlines() if line.strip()]
    return _checked(hosts, "scontrol output")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm compressed nodelist, like `scontrol show hostnames` does.

    `gpu[01-03,07],cpu5` -> `gpu01 gpu02 gpu03 gpu07 cpu5`; zero padding of a range is kept;
    several bracket groups in one name multiply out (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_item(item))
    return _checked(hosts, f"nodelist {nodelist!r}")


def format_hostfile(hosts: list[str], slots: int) -> str:
    """DeepSpeed hostfile text: one `HOST slots=SLOTS` line per host (same slots everywhere)."""
    if not isinstance(slots, int) or slots < 1:
        raise HostfileError(f"slots must be a positive integer (GPUs per node), got {slots!r}")
    return "".join(f"{host} slots={slots}\n" for host in _checked(list(hosts), "host list"))


def parse_hostfile(text: str) -> list[tuple[str, int]]:
    """`[(host, slots), ...]` from DeepSpeed hostfile text; comments and blank lines are skipped."""
    entries = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOSTFILE_LINE.match(line)
        if not match or int(match.group(2)) < 1:
            raise HostfileError(f"hostfile line {lineno}: expected 'HOSTNAME slots=N' (N >= 1), got {raw!r}")
        entries.append((match.group(1), int(match.group(2))))
    _checked([host for host, _ in entries], "hostfile")
    return entries


def _checked(hosts: list[str], what: str) -> list[str]:
    if not hosts:
        raise HostfileError(f"{what}: no hosts")
    bad = [h for h in hosts if not HOSTNAME.match(h)]
    if bad:
        raise HostfileError(f"{what}: not host names: {', '.join(map(repr, bad))}")
    seen, dupes = set(), []
    for host in hosts:
        if host in seen:
            dupes.append(host)
        seen.add(host)
    if dupes:
        # DeepSpeed would silently merge them into one entry and the world size would be wrong
        raise HostfileError(f"{what}: duplicate hosts: {', '.join(sorted(set(dupes)))}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise HostfileError(f"unbalanced ']' in nodelist {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise HostfileError(f"unbalanced '[' in nodelist {text!r}")
    items.append("".join(current))
    if any(not item for item in items):
        raise HostfileError(f"empty entry in nodelist {text!r}")
    return items


def _expand_item(item: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if not match:
        return [item]
    prefix, suffix = item[: match.start()], item[match.end() :]
    names = []
    for part in match.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            numbers = [str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise HostfileError(f"bad range {part!r} in nodelist entry {item!r}")
        names.extend(prefix + number for number in numbers)
    return [expanded for name in names for expanded in _expand_item(name + suffix)]
