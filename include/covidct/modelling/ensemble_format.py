"""The saved ensemble's format: what ``RUN_DIR/ensemble/`` holds and how a reader combines its members.

Written by ``covidct.modelling.ensemble.build_ensemble``; read by ``covidct predict`` and the
scoring job (``covidct.inference.predict``), and logged as an MLflow pyfunc model
(``covidct.lifecycle.pyfunc``)::

    ensemble.json         format, method, threshold, members (backbone, model folder, weights id), stacker
    members/<backbone>/   each member's PipelineModel (featurizer + LR)

A probability above ``THRESHOLD`` is COVID. ``mean`` (the product's method) averages the
members' probabilities; ``stacked`` applies the ``Stacker`` stored in ``ensemble.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidct.core.errors import CovidctError
from covidct.modelling.evaluate import THRESHOLD

MEAN, STACKED = "mean", "stacked"
#: The method ``covidct predict`` classifies with (see ``covidct.modelling.ensemble`` for why).
PRODUCT_METHOD = MEAN
#: How each method is named in reports and the CLI.
METHOD_LABELS = {MEAN: "Ensemble", STACKED: "Ensemble (stacked)"}
MANIFEST = "ensemble.json"
#: The stacker: scikit-learn's LogisticRegression with its default L2 penalty (C=1).
STACKER_C = 1.0

__all__ = ["MANIFEST", "MEAN", "METHOD_LABELS", "PRODUCT_METHOD", "STACKED", "STACKER_C", "THRESHOLD", "Stacker",
           "load_ensemble", "read_model"]  # fmt: skip


@dataclass(frozen=True)
class Stacker:
    """``P(COVID) = sigmoid(intercept + coef · [p_backbone ...])`` over ``members`` in this order."""

    members: tuple[str, ...]
    coef: tuple[float, ...]
    intercept: float
    n_train: int

    def predict(self, probabilities: np.ndarray) -> np.ndarray:
        z = self.intercept + np.asarray(probabilities, dtype=float) @ np.asarray(self.coef)
        return 1.0 / (1.0 + np.exp(-z))

    def to_json(self) -> dict:
        return {
            "members": list(self.members),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "n_train": self.n_train,
            "model": f"sklearn LogisticRegression(C={STACKER_C}) on probabilities",
        }

    @classmethod
    def from_json(cls, data: dict) -> Stacker:
        return cls(tuple(data["members"]), tuple(float(c) for c in data["coef"]), float(data["intercept"]),
                   int(data["n_train"]))  # fmt: skip


def load_ensemble(model_dir: Path) -> dict:
    """``ensemble.json`` of a saved ensemble, its members checked to be there; CovidctError otherwise."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CovidctError(f"{model_dir / MANIFEST} cannot be read: {exc}") from None
    for member in manifest.get("members", []):
        if not (model_dir / member["model"] / "metadata").is_dir():
            raise CovidctError(f"ensemble member {member['backbone']} is missing: {model_dir / member['model']}")
    return manifest


def read_model(model_dir: Path) -> dict | None:
    """The ensemble's manifest, None for a single model's PipelineModel; CovidctError for anything else."""
    if (model_dir / MANIFEST).is_file():
        return load_ensemble(model_dir)
    if not (model_dir / "metadata").is_dir():
        raise CovidctError(
            f"{model_dir} is not a saved model (expected the model/ folder of a training run or RUN_DIR/ensemble)"
        )
    return None
