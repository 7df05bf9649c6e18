"""Explanations: class activation maps of a saved model's predictions, computed in Spark workers.

Where in the scan does the model see COVID? For every image, a map over the backbone's conv
grid of the evidence for COVID, in the logit's own terms:

- **CAM** (``pooling="avg"``: global average pooling of the last conv block, then the LR): the
  model *is* the class-activation-map architecture, so the map is exact and needs no gradients.
  With ``A`` the last conv block's output (``h × w × C``) and ``w, b`` the LR's coefficients and
  intercept (Spark returns them on the original feature scale, even with ``standardization``),
  ``map[i, j] = Σ_c w_c A[i, j, c]`` and ``mean(map) + b`` *is* the model's logit.
- **Grad-CAM** (``flatten`` and the multi-layer poolings ``avg-b345``, ``avgmax-b345``): the
  gradient of the logit with respect to a conv block's output (TensorFlow), averaged over the grid
  per channel (``α_c``), weights that block's channels: ``map = Σ_c α_c A[..., c]``. For
  ``flatten`` the block is the last one (what is flattened); for the multi-layer poolings it is the
  first pooled block (VGG: ``block3_pool``, 28 × 28), because every feature the LR reads (blocks
  3, 4 and 5) is computed from it, so its gradient carries the whole logit.

The raw maps (signed, at the conv grid's size, before upsampling and before any ReLU) are what
``.npy`` files hold. The PNGs show the scan at its own size with the evidence for the predicted
class (the map, or minus the map for non-COVID, upsampled and ReLU'd) overlaid, a colour bar, and
a title naming the backbone, the probability and the method. An ensemble gets one panel per
backbone, side by side.

Both passes run in Spark's Python workers like the featurizer: the Keras model is the
featurizer's worker-side one (``covidct.featurizer.worker_model``: built once per worker, reused,
TensorFlow threads = the task's cores), images go through it in batches, and the PNGs are drawn and
written by the executors (on a cluster, ``OUT_DIR`` must be on a filesystem the executors share
with the driver, as the run folders are). The driver collects only the small maps.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegressionModel
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from covidct.atomic import atomic_dir
from covidct.backbone import MULTI_LAYER_POOLINGS, get_backbone
from covidct.errors import CovidctError
from covidct.featurizer import DeepImageFeaturizer, _bound_arrow_batches, worker_model

log = logging.getLogger(__name__)

CAM, GRAD_CAM = "CAM", "Grad-CAM"
#: Written into OUT_DIR; an existing non-empty OUT_DIR without it is never replaced.
MANIFEST = "explanations.json"
LABELS = {1: "COVID", 0: "non-COVID"}
#: Images per Grad-CAM pass (VGG16 keeps ~60 MB of activations per image for the gradient).
GRAD_CAM_BATCH = 8
THRESHOLD = 0.5


def method_for(pooling: str) -> str:
    """CAM where the model is GAP + linear (exact), Grad-CAM for the other poolings."""
    return CAM if pooling == "avg" else GRAD_CAM


def map_layer(backbone: str, pooling: str) -> str | None:
    """The conv block the map is computed on: None = the last one (CAM, flatten)."""
    if pooling in MULTI_LAYER_POOLINGS:
        return get_backbone(backbone).block_layers(pooling)[0][0]
    return None


@dataclass(frozen=True)
class Explained:
    """One image through one model: its probability, prediction and raw map (signed, conv grid)."""

    backbone: str
    method: str
    layer: str
    probability: float
    prediction: int
    logit: float  # Spark's rawPrediction[1]: the LR's margin
    map: np.ndarray  # (h, w) float32, evidence for COVID before upsampling and ReLU


# --------------------------------------------------------------------------- driver side: maps


def load_model(model_dir: Path) -> tuple[DeepImageFeaturizer, LogisticRegressionModel]:
    """The featurizer and LR of a PipelineModel written by ``covidct train``."""
    model = PipelineModel.load(Path(model_dir).absolute().as_uri())
    stages = model.stages
    if len(stages) != 2 or not isinstance(stages[0], DeepImageFeaturizer):
        raise CovidctError(f"{model_dir} is not a featurizer + logistic regression model; cannot explain it")
    lr = stages[1]
    if not isinstance(lr, LogisticRegressionModel) or lr.numClasses != 2:
        raise CovidctError(f"{model_dir}: only a binary LogisticRegressionModel can be explained")
    return stages[0], lr


def explain_model(model_dir: Path, df: DataFrame) -> dict[str, Explained]:
    """``{path: Explained}`` for every row of ``df`` (``path``, ``image`` bytes), one Spark pass.

    The features come from the same forward pass as the map and go through the model's own LR
    stage, so the probability is the one ``covidct predict`` computes.
    """
    from covidct.train import spark_errors

    featurizer, lr = load_model(model_dir)
    backbone, pooling = featurizer.getModelName(), featurizer.getPooling()
    method, layer = method_for(pooling), map_layer(backbone, pooling)
    coef = np.asarray(lr.coefficients.toArray(), dtype=np.float64)
    if coef.size != featurizer.featureDim():
        raise CovidctError(f"{model_dir}: {coef.size} LR coefficients for {featurizer.featureDim()} features")
    _bound_arrow_batches(df, featurizer.getBatchSize())
    udf = _maps_udf(
        backbone,
        featurizer.getWeights(),
        pooling,
        featurizer.getPrecision(),
        featurizer.getSeed(),
        featurizer.getBatchSize(),
        coef,
    )
    features = featurizer.getOutputCol()
    scored = lr.transform(
        df.withColumn("_explain", udf(F.col(featurizer.getInputCol()), F.col("path"))).withColumn(
            features, array_to_vector("_explain.features")
        )
    )
    with spark_errors():
        rows = scored.select(
            "path",
            vector_to_array(lr.getProbabilityCol())[1].alias("p"),
            F.col(lr.getPredictionCol()).alias("pred"),
            vector_to_array(lr.getRawPredictionCol())[1].alias("logit"),
            "_explain.map",
            "_explain.map_h",
            "_explain.map_w",
        ).collect()
    return {
        r.path: Explained(
            backbone,
            method,
            layer or "last conv block",
            float(r.p),
            int(r.pred),
            float(r.logit),
            np.asarray(r.map, dtype=np.float32).reshape(r.map_h, r.map_w),
        )
        for r in rows
    }


def _maps_udf(
    model_name: str, weights: str, pooling: str, precision: str, seed: int, batch_size: int, coef: np.ndarray
):
    @F.pandas_udf("features array<float>, map array<float>, map_h int, map_w int")
    def maps(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        explainer = worker_explainer(model_name, weights, pooling, seed, precision)
        for images, names in batches:
            feats, cams = explainer.explain(images, names, batch_size, coef)
            yield pd.DataFrame(
                {
                    "features": list(feats),
                    "map": [m.ravel() for m in cams],
                    "map_h": [m.shape[0] for m in cams],
                    "map_w": [m.shape[1] for m in cams],
                }
            )

    return maps


# --------------------------------------------------------------------------- worker side


class Explainer:
    """The featurizer's worker model with a second output: the conv block the map is computed on."""

    def __init__(self, model_name: str, weights: str, pooling: str, seed: int, precision: str = "float32"):
        import keras

        self.worker = worker_model(model_name, weights, pooling, seed, precision)  # the featurizer's cache
        base = self.worker.model
        layer = map_layer(model_name, pooling)
        # avg and flatten: the input of the last layer (the global pool / the flatten) is the last conv block.
        conv = base.layers[-1].input if layer is None else base.get_layer(layer).output
        self.model = keras.Model(base.inputs, [conv, base.output], name=base.name + "_explain")
        self.method = method_for(pooling)

    def explain(self, images, names: pd.Series, batch_size: int, coef: np.ndarray):
        """``features (n, dim) float32`` and the raw maps ``[(h, w) float32]`` of a batch of image bytes."""
        rows = list(images)
        names = [n if isinstance(n, str) else f"row {i}" for i, n in enumerate(names)]
        feats = np.empty((len(rows), self.worker.dim), dtype=np.float32)
        maps: list[np.ndarray] = []
        if self.method == GRAD_CAM:  # the tape keeps every layer's activations: small batches
            batch_size = min(batch_size, GRAD_CAM_BATCH)
        for start in range(0, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            batch = np.stack([self.worker._decode(rows[i], names[i], "bytes") for i in range(start, stop)])
            x = self.worker.preprocess(batch)
            cams, out = self._cam(x, coef) if self.method == CAM else self._grad_cam(x, coef)
            feats[start:stop] = out
            maps.extend(cams)
        return feats, maps

    def _cam(self, x, coef: np.ndarray):
        """CAM: ``map[i, j] = Σ_c w_c A[i, j, c]``; the features are ``A``'s global average, so mean + b = logit."""
        conv, out = self.model.predict_on_batch(x)
        acts = np.asarray(conv).astype(np.float64)
        return np.tensordot(acts, coef, axes=([3], [0])).astype(np.float32), np.asarray(out).astype(np.float32)

    def _grad_cam(self, x, coef: np.ndarray):
        import tensorflow as tf

        weights = tf.constant(coef, dtype=tf.float32)
        with tf.GradientTape() as tape:
            conv, out = self.model(tf.convert_to_tensor(x), training=False)
            logit = tf.reduce_sum(tf.cast(out, tf.float32) * weights, axis=-1)  # + intercept: no gradient
        grads = tf.cast(tape.gradient(logit, conv), tf.float32).numpy().astype(np.float64)
        acts = tf.cast(conv, tf.float32).numpy().astype(np.float64)
        alpha = grads.mean(axis=(1, 2))  # (n, C): Grad-CAM's channel weights
        cams = np.einsum("nhwc,nc->nhw", acts, alpha).astype(np.float32)
        return cams, tf.cast(out, tf.float32).numpy()


_EXPLAINERS: OrderedDict[tuple, Explainer] = OrderedDict()
_EXPLAINERS_LOCK = threading.Lock()


def worker_explainer(model_name: str, weights: str, pooling: str, seed: int, precision: str = "float32") -> Explainer:
    """The worker's explainer for these params, built on first use and reused across tasks."""
    key = (model_name, weights, pooling, precision, seed if weights == "none" else None)
    with _EXPLAINERS_LOCK:
        if key in _EXPLAINERS:
            _EXPLAINERS.move_to_end(key)
            return _EXPLAINERS[key]
        explainer = Explainer(model_name, weights, pooling, seed, precision)
        _EXPLAINERS[key] = explainer
        while len(_EXPLAINERS) > 2:
            _EXPLAINERS.popitem(last=False)
        return explainer


# --------------------------------------------------------------------------- the figures


@dataclass(frozen=True)
class Panel:
    """One backbone's map of one image, as drawn."""

    backbone: str
    method: str
    probability: float
    map: np.ndarray  # raw (h, w), evidence for COVID


PAD, HEAD_H, CBAR_W, MIN_SLOT_W, DPI = 8, 52, 78, 320, 100


def layout(width: int, height: int, panels: int, max_side: int | None = None) -> dict:
    """Pixel geometry of a figure: the scan is drawn at ``(w, h)`` (the input's size unless
    ``max_side`` shrinks it) in each panel's ``box`` ``(left, top, w, h)``, from the figure's top-left."""
    scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    slot = max(w + CBAR_W + 2 * PAD, MIN_SLOT_W)
    fig_w, fig_h = slot * panels, h + HEAD_H + PAD
    boxes = [(k * slot + PAD, HEAD_H, w, h) for k in range(panels)]
    return {"size": (fig_w, fig_h), "scan": (w, h), "boxes": boxes}


def evidence(raw: np.ndarray, covid: bool, size: tuple[int, int]) -> np.ndarray:
    """The map of the predicted class, upsampled (bilinear) to ``size`` (w, h), then ReLU'd."""
    from PIL import Image

    signed = np.asarray(raw, dtype=np.float32) * (1.0 if covid else -1.0)
    up = np.asarray(Image.fromarray(signed).resize(size, Image.Resampling.BILINEAR))
    return np.maximum(up, 0.0)


def render(
    image: bytes, name: str, headline: str, panels: list[Panel], covid: bool, max_side: int | None = None
) -> bytes:
    """The PNG: the scan with the evidence for the predicted class overlaid, one panel per backbone."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from PIL import Image

    from covidct.image import open_image, to_rgb

    scan = to_rgb(open_image(image, name)).convert("L")
    geo = layout(scan.width, scan.height, len(panels), max_side)
    (fig_w, fig_h), (w, h) = geo["size"], geo["scan"]
    if (w, h) != scan.size:
        scan = scan.resize((w, h), Image.Resampling.BILINEAR)
    gray = np.asarray(scan)
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 5 / fig_h, headline, ha="center", va="top", fontsize=8, fontweight="bold")
    cmap = colormaps["jet"]
    target = LABELS[int(covid)]
    for panel, (left, top, _, _) in zip(panels, geo["boxes"], strict=True):
        heat = evidence(panel.map, covid, (w, h))
        vmax = float(heat.max()) if heat.max() > 0 else 1e-9
        norm = Normalize(0.0, vmax)
        rgba = cmap(norm(heat))
        rgba[..., 3] = 0.55 * np.clip(heat / vmax, 0, 1)
        bottom = fig_h - top - h
        ax = fig.add_axes((left / fig_w, bottom / fig_h, w / fig_w, h / fig_h))
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="none", aspect="auto")
        ax.imshow(rgba, interpolation="none", aspect="auto")
        ax.set_axis_off()
        fig.text(
            left / fig_w,
            (bottom + h + 4) / fig_h,
            f"{panel.backbone} · {panel.method} · P(COVID) = {panel.probability:.3f}",
            ha="left",
            va="bottom",
            fontsize=8,
        )
        cax = fig.add_axes(((left + w + 6) / fig_w, bottom / fig_h, 12 / fig_w, h / fig_h))
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        bar.set_label(f"{target} evidence ({'logit' if panel.method == CAM else 'relative'})", fontsize=6)
        bar.ax.tick_params(labelsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# --------------------------------------------------------------------------- writing files


@dataclass(frozen=True)
class Item:
    """One image to draw: where its files go (``name``, relative to OUT_DIR) and what they show."""

    path: str  # the image's Spark path (URI), as in the ``path`` column
    name: str  # output stem relative to OUT_DIR: <name>.png, <name>.npy (or <name>.<backbone>.npy)
    headline: str
    covid: bool  # the predicted class, whose evidence is drawn
    panels: tuple[Panel, ...]


def local_path(uri: str) -> Path:
    """A ``file:`` URI of Spark's ``path`` column as a local path."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path) if parsed.scheme in ("file", "") else uri)


def output_name(uri: str, root: Path) -> str:
    """``CT_COVID/x%1.png`` -> ``CT_COVID/x%1.png.map``: the image's place under ``root``, never outside."""
    path = local_path(uri)
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(path.name)
    return str(rel) + ".map"


def check_out_dir(out: Path) -> None:
    """Refuse an OUT_DIR that exists and is not a previous explanations folder (it would be replaced)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise CovidctError(f"{out} exists and is not a covidct explanations folder; refusing to replace it")


def write_explanations(
    df: DataFrame, items: list[Item], out: Path, *, max_side: int | None = None, about: dict | None = None
) -> dict[str, tuple[Path, list[Path]]]:
    """Draw and write every item's PNG and ``.npy`` into ``out`` (atomically), in the Spark workers.

    ``df`` holds the images (``path``, ``image`` bytes). Returns ``{path: (png, [npy, ...])}``.
    """
    from covidct.train import spark_errors

    out = Path(out).expanduser().absolute()
    check_out_dir(out)
    spark = df.sparkSession
    specs = [(i.path, i.name, json.dumps(_spec(i))) for i in items]
    with atomic_dir(out, what="explain") as staging:
        todo = spark.createDataFrame(specs, "path string, name string, spec string")
        joined = todo.join(df.select("path", "image"), "path")
        udf = _render_udf(str(staging), str(out), max_side)
        with spark_errors():
            rows = joined.select("path", udf("image", "path", "name", "spec").alias("f")).collect()
        (staging / MANIFEST).write_text(
            json.dumps(
                {"created_at": datetime.now(UTC).isoformat(timespec="seconds"), "images": len(rows), **(about or {})},
                indent=2,
            )
            + "\n"
        )
    return {r.path: (Path(r.f.png), [Path(p) for p in r.f.npy]) for r in rows}


def _spec(item: Item) -> dict:
    return {
        "headline": item.headline,
        "covid": bool(item.covid),
        "panels": [
            {
                "backbone": p.backbone,
                "method": p.method,
                "probability": p.probability,
                "map": np.asarray(p.map, dtype=np.float32).tolist(),
            }
            for p in item.panels
        ],
    }


def _render_udf(staging: str, final: str, max_side: int | None):
    @F.pandas_udf("png string, npy array<string>")
    def draw(batches: Iterator[tuple[pd.Series, pd.Series, pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        for images, paths, names, specs in batches:
            pngs, npys = [], []
            for image, path, name, spec in zip(images, paths, names, specs, strict=True):
                png, npy = _draw_one(image, path, name, json.loads(spec), Path(staging), max_side)
                pngs.append(os.path.join(final, png))
                npys.append([os.path.join(final, n) for n in npy])
            yield pd.DataFrame({"png": pngs, "npy": npys})

    return draw


def _draw_one(image: bytes, path: str, name: str, spec: dict, staging: Path, max_side: int | None):
    panels = [
        Panel(p["backbone"], p["method"], float(p["probability"]), np.asarray(p["map"], dtype=np.float32))
        for p in spec["panels"]
    ]
    png = render(image, path, spec["headline"], panels, bool(spec["covid"]), max_side)
    target = staging / (name + ".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    _write(target, png)
    npys = []
    for p in panels:
        npy = name + (".npy" if len(panels) == 1 else f".{p.backbone}.npy")
        buf = io.BytesIO()
        np.save(buf, p.map)
        _write(staging / npy, buf.getvalue())
        npys.append(npy)
    return name + ".png", npys


def _write(path: Path, data: bytes) -> None:
    """Whole files only (a retried task rewrites the same content)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- predict --explain


def headline(label: str, probability: float, image: str) -> str:
    return f"{label}: P(COVID) = {probability:.3f} → {LABELS[int(probability > THRESHOLD)]}\n{image}"


def explain_rows(
    rows: list[dict],
    maps: dict[str, dict[str, Explained]],
    df: DataFrame,
    images: Path,
    out: Path,
    model: str,
    max_side: int | None = None,
) -> list[dict]:
    """Add ``explanation_png``, ``explanation_npy`` and ``explain_method`` to predict's rows, writing the files.

    ``maps``: ``{backbone: {path: Explained}}`` (one backbone, or an ensemble's members in order).
    """
    root = images if images.is_dir() else images.parent
    backbones = list(maps)
    items = []
    for r in rows:
        panels = tuple(
            Panel(b, maps[b][r["path"]].method, maps[b][r["path"]].probability, maps[b][r["path"]].map)
            for b in backbones
        )
        title = backbones[0] if len(backbones) == 1 else f"Ensemble ({r.get('method', 'mean')})"
        items.append(
            Item(
                r["path"],
                output_name(r["path"], root),
                headline(title, r["probability"], local_path(r["path"]).name),
                bool(r["prediction"]),
                panels,
            )
        )
    firsts = {b: next(iter(maps[b].values()), None) for b in backbones}
    about = {
        "model": str(model),
        "source": str(images),
        "maps": {b: {"method": e.method, "layer": e.layer} for b, e in firsts.items() if e is not None},
    }
    written = write_explanations(df, items, out, max_side=max_side, about=about)
    for r in rows:
        png, npys = written[r["path"]]
        methods = {maps[b][r["path"]].method for b in backbones}
        r["explanation_png"] = str(png)
        r["explanation_npy"] = ";".join(str(n) for n in npys)
        r["explain_method"] = (
            methods.pop() if len(methods) == 1 else "; ".join(f"{b}: {maps[b][r['path']].method}" for b in backbones)
        )
    return rows
