"""The explainer in Spark's Python workers: class activation maps from the featurizer's own Keras model.

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

The explainer is the featurizer's worker model (``covidct.features.workers``: built once per worker,
reused, TensorFlow threads = the task's cores) with a second output, the conv block the map is
computed on; it is kept per worker the same way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidct.data.body import FULL
from covidct.features.backbone import MULTI_LAYER_POOLINGS, get_backbone
from covidct.features.workers import WorkerCache, model_key, worker_model

CAM, GRAD_CAM = "CAM", "Grad-CAM"
#: Images per Grad-CAM pass (VGG16 keeps ~60 MB of activations per image for the gradient).
GRAD_CAM_BATCH = 8


def method_for(pooling: str) -> str:
    """CAM where the model is GAP + linear (exact), Grad-CAM for the other poolings."""
    return CAM if pooling == "avg" else GRAD_CAM


def map_layer(backbone: str, pooling: str) -> str | None:
    """The conv block the map is computed on: None = the last one (CAM, flatten)."""
    if pooling in MULTI_LAYER_POOLINGS:
        return get_backbone(backbone).block_layers(pooling)[0][0]
    return None


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

    def explain(
        self, images, names: pd.Series, batch_size: int, coef: np.ndarray, view: str = FULL, flips: bool = False
    ):
        """``features (n, dim) float32`` and the raw maps ``[(h, w) float32]`` of a batch of image bytes.

        ``view``: the picture the featurizer shows (``covidct.data.body``); ``flips``: the maps and features
        of the picture and of its mirror image (its map mirrored back), averaged, as the featurizer does.
        """
        rows = list(images)
        names = [n if isinstance(n, str) else f"row {i}" for i, n in enumerate(names)]
        feats = np.empty((len(rows), self.worker.dim), dtype=np.float32)
        maps: list[np.ndarray] = []
        if self.method == GRAD_CAM:  # the tape keeps every layer's activations: small batches
            batch_size = min(batch_size, GRAD_CAM_BATCH)
        for start in range(0, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            batch = np.stack([self.worker.decode(rows[i], names[i], "bytes", view) for i in range(start, stop)])
            x = self.worker.preprocess(batch)
            method = self._cam if self.method == CAM else self._grad_cam
            cams, out = method(x, coef)
            if flips:
                mirrored_cams, mirrored_out = method(x[:, :, ::-1, :].copy(), coef)
                cams = (np.asarray(cams) + np.asarray(mirrored_cams)[:, :, ::-1]) / 2
                out = (np.asarray(out) + np.asarray(mirrored_out)) / 2
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


_EXPLAINERS: WorkerCache[Explainer] = WorkerCache()


def worker_explainer(model_name: str, weights: str, pooling: str, seed: int, precision: str = "float32") -> Explainer:
    """The worker's explainer for these params, built on first use and reused across tasks."""
    return _EXPLAINERS.get(
        model_key(model_name, weights, pooling, seed, precision),
        lambda: Explainer(model_name, weights, pooling, seed, precision),
    )
