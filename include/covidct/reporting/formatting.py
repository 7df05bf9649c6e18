"""How numbers read in the report: percentages, intervals, p-values, seconds, seed lists; JSON-safe values."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from covidct.modelling.stats import Interval


def number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" if percent else f"{value:.3f}"


def fmt_ci(interval: Interval | dict | None, percent: bool) -> str:
    """An Interval, or a metric of summary.json (``{"ci_low": ..., "ci_high": ...}``), as ``[low, high]``."""
    if isinstance(interval, dict):
        low, high = interval.get("ci_low"), interval.get("ci_high")
    else:
        low, high = (None, None) if interval is None else (interval.low, interval.high)
    if low is None:
        return "95 % CI n/a"
    return f"[{fmt(low, percent)}, {fmt(high, percent)}]"


def fmt_p(p: float) -> str:
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def seconds(value) -> str:
    found = number(value)
    return "—" if found is None else f"{found:.1f}"


def seed_ranges(seeds) -> str:
    """[0, 1, 2, 3, 7] -> '0-3, 7'."""
    seeds, parts = sorted(seeds), []
    for s in seeds:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def mean_sd(described: dict, percent: bool) -> str:
    if described.get("mean") is None:
        return "—"
    sd = described.get("sd")
    return fmt(described["mean"], percent) + ("" if sd is None else f" ± {fmt(sd, percent)}")


def min_max(described: dict, percent: bool) -> str:
    if described.get("min") is None:
        return "—"
    return f"{fmt(described['min'], percent)}–{fmt(described['max'], percent)}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "split"


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
