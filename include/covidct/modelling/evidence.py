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

One pass over the test images in the workers, with every split's LR at once (the conv block is
computed once per image); the driver collects one number per image and split. Other poolings have
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
from covidct.data.body import BODY_VERSION, body_mask, grid_share
from covidct.features.featurizer import DeepImageFeaturizer
from covidct.features.workers import bound_arrow_batches, worker_model

log = logging.getLogger(__name__)

METHOD = "CAM"
BODY_SHARE = "body_share"


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


def evidence_inside_body(df: DataFrame, featurizer: DeepImageFeaturizer, models: dict[str, tuple]) -> pd.DataFrame:
    """``relpath``, ``body_share`` (of the picture) and one column per model: each image's evidence share inside
    the body.

    ``df``: ``path, relpath, image`` (file bytes); ``models``: ``{name: (coefficients, intercept)}`` of LRs
    on ``featurizer``'s features (``avg`` pooling).
    """
    names = list(models)
    coefs = np.stack([np.asarray(models[n][0], dtype=np.float64) for n in names], axis=1)  # (C, k)
    intercepts = np.asarray([float(models[n][1]) for n in names])
    bound_arrow_batches(df, featurizer.getBatchSize())
    udf = _shares_udf(featurizer, coefs, intercepts)
    with spark_errors():
        rows = df.select("relpath", udf(F.col(featurizer.getInputCol()), F.col("path")).alias("s")).collect()
    frame = pd.DataFrame([[r.relpath, *r.s] for r in rows], columns=["relpath", *names, BODY_SHARE])
    return frame.sort_values("relpath", kind="stable").reset_index(drop=True)


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
    params = (
        featurizer.getModelName(),
        featurizer.getWeights(),
        featurizer.getPooling(),
        featurizer.getSeed(),
        featurizer.getPrecision(),
    )
    view, flips, batch_size = featurizer.getView(), featurizer.getFlips(), featurizer.getBatchSize()

    @F.pandas_udf("array<double>")
    def evidence(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        model = worker_model(*params)
        for images, paths in batches:
            rows, out = list(images), []
            for start in range(0, len(rows), batch_size):
                stop = min(start + batch_size, len(rows))
                pictures = np.stack([model.decode(rows[i], paths.iloc[i], "bytes", view) for i in range(start, stop)])
                x = model.preprocess(pictures.copy())
                conv = model.conv_block(x).astype(np.float64)
                if flips:  # the mirror image's block, mirrored back: the features' mean is this block's mean
                    conv = (conv + model.conv_block(x[:, :, ::-1, :].copy()).astype(np.float64)[:, :, ::-1, :]) / 2
                grid = conv.shape[1:3]
                inside = np.stack([grid_share(body_mask(p).mask, grid) for p in pictures])
                cams = np.tensordot(conv, coefs, axes=([3], [0]))  # (n, h, w, k)
                found = shares(cams, intercepts, inside)
                out.extend(np.concatenate([found, inside.mean(axis=(1, 2))[:, None]], axis=1).tolist())
            yield pd.Series(out)

    return evidence
