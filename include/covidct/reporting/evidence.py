"""Where the evidence lies: per split and backbone, the share of the evidence for the predicted class inside the body.

The train jobs measure it (``covidct.modelling.evidence``: CAM over the test images, a body mask from
thresholding and the largest pieces of tissue) and write it into metrics.json's ``evidence``; here it
becomes the report's "Where the evidence lies" section and ``summary.json["evidence"]``, with the
body's own share of the picture beside it: evidence spread evenly over the picture would put that share
inside the body, so a backbone at or below it does not look at the patient more than at the margins.
"""

from __future__ import annotations

from pathlib import Path

from covidct.data.body import BODY_BLANK, FULL
from covidct.reporting.comparison import SPLIT_TITLES, SplitResult
from covidct.reporting.sections import append_section

KEY = "evidence"  # summary.json's key and the section's templates (section_evidence.*.j2)
#: A backbone whose share exceeds the body's own by less than this looks everywhere alike.
MARGIN = 0.02


def _row(entry) -> dict | None:
    found = entry.metrics.get("evidence")
    if entry.metrics.get("ensemble") or not isinstance(found, dict) or found.get("inside_body") is None:
        return None
    return {
        "model": entry.label,
        "view": entry.metrics.get("view") or FULL,
        "flips": bool(entry.metrics.get("flips")),
        "inside_body": found["inside_body"],
        "body_share": found.get("body_share"),
        "images": found.get("images"),
        "without_evidence": found.get("without_evidence", 0),
        "random_weights": bool(entry.metrics.get("random_weights")),
    }


def sentence(split: str, rows: list[dict]) -> str:
    """What the shares mean, in one sentence."""
    low, high = min(r["inside_body"] for r in rows), max(r["inside_body"] for r in rows)
    span = f"{100 * low:.0f} %" if round(100 * low) == round(100 * high) else f"{100 * low:.0f}–{100 * high:.0f} %"
    bodies = [r["body_share"] for r in rows if r["body_share"] is not None]
    text = f"On {split} the backbones put {span} of the evidence for their predicted class inside the body"
    if not bodies:
        return text + "."
    body = sum(bodies) / len(bodies)
    text += f", which covers {100 * body:.0f} % of the picture on average"
    blank = " (black outside the body: what lies there is the body's outline)" if all(
        r["view"] == BODY_BLANK for r in rows) else ""  # fmt: skip
    lookers = [r["model"] for r in rows if r["body_share"] is not None and r["inside_body"] < r["body_share"] + MARGIN]
    if lookers:
        return text + (
            f": {', '.join(lookers)} put no more of it on the patient than evidence spread evenly would{blank}; what "
            "they score may come from the margins, borders and labels of the figure as much as from the lungs."
        )
    return text + f": more than evidence spread evenly would; the rest lies off the patient{blank}."


def evidence_summary(splits: dict[str, SplitResult]) -> dict:
    parts = []
    for name, split in splits.items():
        rows = [r for r in (_row(e) for e in split.entries) if r is not None]
        if rows:
            parts.append({"split": name, "title": SPLIT_TITLES.get(name, name), "rows": rows,
                          "sentence": sentence(name, rows)})  # fmt: skip
    return {"splits": parts}


def append_evidence_section(report_dir: Path, splits: dict[str, SplitResult]) -> dict:
    """The section (only where some backbone measured its evidence) and ``summary.json["evidence"]``."""
    data = evidence_summary(splits)
    if data["splits"]:
        append_section(report_dir, KEY, KEY, data)
    return data
