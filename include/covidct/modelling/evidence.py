"""Where the evidence lies: the share of a model's evidence for its predicted class that falls inside the body.

For ``avg`` pooling the LR on the features *is* a class-activation-map model (``covidct.inference.explainer``):
with ``A`` the last conv block and ``w, b`` the LR's coefficients and intercept, ``cam = Σ_c w_c A[..., c]``
over the conv grid, and ``mean(cam) + b`` is the logit. The evidence for the predicted class is the
positive part of ``cam`` (COVID predicted) or of ``-cam`` (non-COVID). Its share inside the body is
``Σ inside · evidence / Σ evidence``, where ``inside`` is the share of each grid cell that lies in the
body mask (``covidct.data.body``, computed on the very picture the backbone sees: after the view
and the resize). 1.0: all the evidence lies on the patient; a share near the body's own share of the
picture (``body_share``, recorded beside it): the model looks everywhere alike; lower: it looks at
the margins, borders or labels.

Every split's LR at once, in the workers, from each test image's last conv block: the one the featurization
pass computed and the feature cache keeps beside the features (``covidct.features.workers.Grid``), or, for an
image without one (a feature cache written before grids, no cache), a forward pass over the image. The driver
collects one number and one small map (the conv grid's cells) per image and split. Other poolings have
no exact CAM: no share (``None``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from covidct.core.spark_errors import spark_errors
from covidct.data.body import BODY_VERSION
from covidct.features.featurizer import DeepImageFeaturizer
from covidct.features.workers import Grid, bound_arrow_batches, worker_model

log = logging.getLogger(__name__)

METHOD = "CAM"
BODY_SHARE = "body_share"
#: Per image: the models' shares then the body's share of the picture; the models' maps (h, w, k) flattened.
RESULT_SCHEMA = "shares array<double>, cams array<float>, h int, w int"


def shares(cams: np.ndarray, intercepts: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Per image and model, the share of the predicted class's positive evidence inside the body.

    ``cams`` (n, h, w, k): k models' maps; ``intercepts`` (k,); ``inside`` (n, h, w): each cell's share
    in the body. NaN where a map has no evidence for its predicted class at all.
    """
    logits = cams.mean(axis=(1, 2)) + intercepts  # (n, k)
    sign = np.where(logits > 0, 1.0, -1.0)[:, None, None, :]
    evidence = np.maximum(cams * sign, 0.0)
    total = evidence.sum(axis=(1, 2))
    inner = (evidence * inside[..., None]).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, inner / total, np.nan)


def evidence_inside_body(
    featurizer: DeepImageFeaturizer,
    models: dict[str, tuple],
    images: DataFrame | None = None,
    grids: DataFrame | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """``(frame, maps)``: ``frame`` has ``relpath``, ``body_share`` (of the picture) and one column per model, each
    image's evidence share inside the body; ``maps[model][relpath]`` is the model's CAM ``(h, w)`` of the image
    (what the report's gallery draws).

    ``models``: ``{name: (coefficients, intercept)}`` of LRs on ``featurizer``'s features (``avg`` pooling).
    ``grids``: ``relpath, grid, grid_shape, inside`` from the featurization pass (the feature cache): no forward
    pass. ``images``: ``path, relpath, image`` (file bytes) of images without a grid: one forward pass each.
    """
    names = list(models)
    coefs = np.stack([np.asarray(models[n][0], dtype=np.float64) for n in names], axis=1)  # (C, k)
    intercepts = np.asarray([float(models[n][1]) for n in names])
    parts = []
    if grids is not None:
        udf = _grid_shares_udf(coefs, intercepts)
        parts.append(grids.select("relpath", udf("grid", "grid_shape", "inside").alias("s")))
    if images is not None:
        bound_arrow_batches(images, featurizer.getBatchSize())
        udf = _shares_udf(featurizer, coefs, intercepts)
        parts.append(images.select("relpath", udf(F.col(featurizer.getInputCol()), F.col("path")).alias("s")))
    with spark_errors():
        rows = [row for part in parts for row in part.collect()]
    rows = list({r.relpath: r for r in rows}.values())  # one per image (a grid cached twice gives two equal rows)
    frame = pd.DataFrame([[r.relpath, *r.s.shares] for r in rows], columns=["relpath", *names, BODY_SHARE])
    maps = {
        name: {r.relpath: np.asarray(r.s.cams, dtype=np.float32).reshape(r.s.h, r.s.w, len(names))[..., k]
               for r in rows}
        for k, name in enumerate(names)
    }  # fmt: skip
    return frame.sort_values("relpath", kind="stable").reset_index(drop=True), maps


def summarize(values: pd.Series, body_share: pd.Series) -> dict:
    """metrics.json's ``evidence``: the mean share over the images that have evidence, the body's mean share of
    the picture (what evidence spread evenly would give), and how it was made."""
    valid = values.dropna()
    return {
        "inside_body": round(float(valid.mean()), 4) if len(valid) else None,
        "body_share": round(float(body_share.mean()), 4) if len(body_share) else None,
        "images": int(len(valid)),
        "without_evidence": int(values.isna().sum()),
        "method": METHOD,
        "mask": BODY_VERSION,
    }


def _shares_udf(featurizer: DeepImageFeaturizer, coefs: np.ndarray, intercepts: np.ndarray):
    """The forward pass for images without a cached grid: the featurization pass's own grids
    (``WorkerModel.features_and_grids``), then the same shares and maps as from cached ones."""
    params = (
        featurizer.getModelName(),
        featurizer.getWeights(),
        featurizer.getPooling(),
        featurizer.getSeed(),
        featurizer.getPrecision(),
    )
    view, flips, batch_size = featurizer.getView(), featurizer.getFlips(), featurizer.getBatchSize()

    @F.pandas_udf(RESULT_SCHEMA)
    def evidence(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        model = worker_model(*params)
        for images, paths in batches:
            _features, grids = model.features_and_grids(images, paths, "bytes", batch_size, view, flips)
            yield pd.DataFrame(_grid_results(grids, coefs, intercepts))

    return evidence


def _results(conv: np.ndarray, inside: np.ndarray, coefs: np.ndarray, intercepts: np.ndarray) -> list[dict]:
    """``RESULT_SCHEMA`` rows of a batch: ``conv`` (n, h, w, C) float64, ``inside`` (n, h, w)."""
    cams = np.tensordot(conv, coefs, axes=([3], [0]))  # (n, h, w, k)
    found = shares(cams, intercepts, inside)
    values = np.concatenate([found, inside.mean(axis=(1, 2))[:, None]], axis=1)
    h, w = conv.shape[1:3]
    return [{"shares": v.tolist(), "cams": c.astype(np.float32).ravel(), "h": h, "w": w}
            for v, c in zip(values, cams, strict=True)]  # fmt: skip


def _grid_results(grids: list[Grid], coefs: np.ndarray, intercepts: np.ndarray) -> list[dict]:
    """``RESULT_SCHEMA`` rows of grids (one image each)."""
    if not grids:
        return []
    conv = np.stack([g.conv for g in grids]).astype(np.float64)
    return _results(conv, np.stack([g.inside for g in grids]), coefs, intercepts)


def _grid_shares_udf(coefs: np.ndarray, intercepts: np.ndarray):
    @F.pandas_udf(RESULT_SCHEMA)
    def evidence(grids: pd.Series, shapes: pd.Series, insides: pd.Series) -> pd.DataFrame:
        found = [Grid.from_record(*record) for record in zip(grids, shapes, insides, strict=True)]
        return pd.DataFrame(_grid_results(found, coefs, intercepts))

    return evidence
