"""From scored CT slices to one result per series: the stated rule, beside the slices' own rows.

COVID-19 pneumonia shows on some slices of a chest CT, not all: a mean over every slice would
dilute a clear finding, and the single highest slice would follow one noisy slice. The rule:

    series probability = mean of the k highest slice probabilities, k = ceil(10 % of the series' slices), k >= 1
    series label       = COVID when that probability exceeds the model's threshold

Series are keyed by the keyed hashes of their SeriesInstanceUID and StudyInstanceUID
(``covidct.data.dicom``), never by the UIDs. A series' technical tags (slice thickness,
kernel) are listed when all its slices agree, else ``mixed``.
"""

from __future__ import annotations

import math

import pandas as pd

from covidct.data.dataset import LABEL_NAMES
from covidct.data.dicom import DICOM_PREPROCESSING, NOTICE

TOP_SHARE = 0.10
RULE = "mean of the top ceil(10% of slices) slice probabilities (at least 1)"
COLUMNS = ["study_uid_hash", "series_uid_hash", "slices", "top_k", "probability", "label", "rule", "modality",
           "slice_thickness", "kernel", "window", "preprocessing", "notice"]  # fmt: skip


DTYPES = {c: "string" for c in COLUMNS} | {"slices": "Int64", "top_k": "Int64", "probability": "Float64"}


def top_k(n_slices: int) -> int:
    return max(1, math.ceil(TOP_SHARE * n_slices))


def series_probability(probabilities) -> float:
    ranked = sorted((float(p) for p in probabilities), reverse=True)
    return sum(ranked[: top_k(len(ranked))]) / top_k(len(ranked))


def series_table(slices: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """One row per series of ``slices`` (rows with ``series_uid_hash``, ``study_uid_hash``, ``probability``
    and the DICOM columns); images without a series are left out. Sorted by study, then series."""
    if "series_uid_hash" not in slices:
        return pd.DataFrame(columns=COLUMNS).astype(DTYPES)
    dicom = slices[slices["series_uid_hash"].notna()]
    rows = []
    for (study, series), group in dicom.groupby(["study_uid_hash", "series_uid_hash"], sort=True):
        p = series_probability(group["probability"])
        rows.append(
            {
                "study_uid_hash": study,
                "series_uid_hash": series,
                "slices": len(group),
                "top_k": top_k(len(group)),
                "probability": p,
                "label": LABEL_NAMES[int(p > threshold)],
                "rule": RULE,
                "modality": _agreed(group["modality"]),
                "slice_thickness": _agreed(group["slice_thickness"]),
                "kernel": _agreed(group["kernel"]),
                "window": _agreed(group["window"]),
                "preprocessing": DICOM_PREPROCESSING,
                "notice": NOTICE,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS).astype(DTYPES)


def _agreed(values: pd.Series):
    """The series' value as text (``1.25``, ``B30f``), ``mixed`` when its slices differ, None when none has it."""
    found = sorted({f"{v:g}" if isinstance(v, float) else str(v) for v in values.dropna()})
    if not found:
        return None
    return found[0] if len(found) == 1 else "mixed"
