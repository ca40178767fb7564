"""Markdown formatting shared by the benchmark report's sections (report.py, report_diagnosis.py)."""
from __future__ import annotations

import math


def missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x, digits=1) -> str:
    return "-" if missing(x) else f"{100.0 * x:.{digits}f}%"


def signed_pct(x, digits=2) -> str:
    return "-" if missing(x) else f"{100.0 * x:+.{digits}f}%"


def num(x, fmt=".3f") -> str:
    return "-" if missing(x) else format(x, fmt)


def human_bytes(n) -> str:
    if missing(n):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0


def seconds(s) -> str:
    if missing(s):
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]
