"""What the validation gate found in a run's data, as a report section: pictures filed twice.

The validate task keeps a copy of the gate's ``result.json`` in the run folder (``RUN_DIR/validation.json``,
``covidct.orchestration.pipeline``). Its near-duplicate pairs across classes or official splits
(``covidct.data.duplicates``) become the report's "Data" section: both files, their class and split, how
many of the hash's bits differ, and both pictures side by side; ``summary.json["data"]`` holds the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from covidct.core.atomic import atomic_file
from covidct.core.errors import ImageDecodeError
from covidct.data.duplicates import WITHIN_A_SPLIT, side_by_side
from covidct.reporting.sections import append_section

log = logging.getLogger(__name__)

RUN_COPY = "validation.json"  # the gate's result.json, copied into the run folder by the validate task
FOLDER = "near-duplicates"  # the pairs' thumbnails, in the report folder
THUMB_HEIGHT = 128  # pixels


def append_data_section(report_dir: str | Path, validation_json: str | Path) -> dict | None:
    """Add the "Data" section from ``validation_json`` (a gate's result); None when there is none to read."""
    report_dir, validation_json = Path(report_dir), Path(validation_json)
    try:
        result = json.loads(validation_json.read_text(encoding="utf-8"))
        found = result["near_duplicates"]
    except (OSError, ValueError, KeyError, TypeError):
        log.info("no near-duplicate audit in the report: %s is missing or from an older covidct", validation_json)
        return None
    data_dir = Path(result.get("data_dir") or "")
    pairs = [dict(p) for p in found.get("pairs", []) if p.get("kind") != WITHIN_A_SPLIT]
    images = {}
    for n, pair in enumerate(pairs, 1):
        thumbnail = _side_by_side(data_dir, pair["relpath_a"], pair["relpath_b"], report_dir / FOLDER / f"{n}.png")
        if thumbnail is not None:
            images[n] = thumbnail
            pair["thumbnail"] = f"{FOLDER}/{n}.png"
    data = {
        "policy": found.get("policy"),
        "hash": found.get("hash"),
        "max_distance_bits": found.get("max_distance_bits"),
        "pairs": pairs,
        "within_a_split": sum(1 for p in found.get("pairs", []) if p.get("kind") == WITHIN_A_SPLIT),
        "validated_at": result.get("validated_at"),
    }
    append_section(report_dir, "data", "data", data, images=images)
    return data


def _side_by_side(data_dir: Path, a: str, b: str, out: Path) -> Path | None:
    """Both pictures at THUMB_HEIGHT, side by side, as a PNG at ``out`` (atomically); None if one is unreadable."""
    try:
        canvas = side_by_side(data_dir, a, b, THUMB_HEIGHT)
    except (OSError, ImageDecodeError) as exc:
        log.warning("no thumbnail of the near-duplicates %s and %s: %s", a, b, exc)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        canvas.save(tmp, format="PNG")
    return out
