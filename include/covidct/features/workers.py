"""The featurizer's worker side: Keras backbones built in Spark's Python workers, kept and reused across tasks.

A Python worker builds the model for a set of params (backbone, weights, pooling, precision, and
the seed of random weights) on first use and keeps the last ``MAX_KEPT`` of them
(``WorkerCache``): the next task with the same params reuses it instead of rebuilding (seconds)
and reloading weights (hundreds of MB). The explainer (``covidct.inference.explainer``) keeps
its models the same way. TensorFlow gets the task's cores (``spark.task.cpus``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame

from covidct.data import image as imagelib
from covidct.data.body import FULL
from covidct.features.backbone import MULTI_LAYER_POOLINGS, get_backbone, resolve_weights

log = logging.getLogger(__name__)

ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"
#: Rows per Arrow batch the featurizer allows (Spark's default, 10,000 image rows, is GBs).
MAX_ARROW_ROWS = 256
#: Models a worker keeps (each up to a few hundred MB).
MAX_KEPT = 2

T = TypeVar("T")

#: How a grid's conv block is stored: half precision (a map is drawn in 8-bit colour; 11 significant bits
#: keep a CAM within ~0.1 % of its float32 value) halves the feature cache's size.
GRID_DTYPE = np.float16
#: The largest magnitude a grid holds: half precision's (65,504); a larger activation is clipped to it, not
#: turned into inf (which would make every map and evidence share drawn from the grid NaN).
GRID_MAX = float(np.finfo(GRID_DTYPE).max)


@dataclass(frozen=True)
class Grid:
    """One image's last conv block ``(h, w, C)`` (``GRID_DTYPE``) and each grid cell's share inside the body
    (``(h, w)``, ``covidct.data.body.grid_share`` of the very picture the backbone saw)."""

    conv: np.ndarray
    inside: np.ndarray

    @classmethod
    def of(cls, conv: np.ndarray, inside: np.ndarray) -> Grid:
        """A grid from a float32 conv block: in ``GRID_DTYPE``, clipped to its range (``GRID_MAX``)."""
        return cls(np.clip(conv, -GRID_MAX, GRID_MAX).astype(GRID_DTYPE), inside)

    def to_record(self) -> dict:
        h, w, c = self.conv.shape
        return {"grid": self.conv.tobytes(), "grid_shape": [h, w, c],
                "inside": self.inside.astype(np.float32).ravel()}  # fmt: skip

    @classmethod
    def from_record(cls, grid: bytes, shape, inside) -> Grid:
        h, w, c = (int(v) for v in shape)
        conv = np.frombuffer(grid, dtype=GRID_DTYPE).reshape(h, w, c)
        return cls(conv, np.asarray(inside, dtype=np.float32).reshape(h, w))


class WorkerCache(Generic[T]):
    """The last ``size`` objects built in this worker process, by key; one built at a time (a lock)."""

    def __init__(self, size: int = MAX_KEPT):
        self.size = size
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The object kept under ``key``, else ``build()``'s (kept; the least recently used goes)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            item = build()
            self._items[key] = item
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return item


def model_key(model_name: str, weights: str, pooling: str, seed: int, precision: str) -> tuple:
    """What identifies a worker's model: the seed counts only for random weights."""
    return (model_name, weights, pooling, precision, seed if weights == "none" else None)


def bound_arrow_batches(dataset: DataFrame, batch_size: int) -> None:
    """Keep the Arrow batches that carry image bytes to the Python workers small (``MAX_ARROW_ROWS``)."""
    spark = dataset.sparkSession
    limit = max(batch_size, MAX_ARROW_ROWS)
    current = int(spark.conf.get(ARROW_BATCH_CONF, "10000"))
    if current <= 0 or current > limit:
        log.info("setting %s=%d (was %d) so image batches stay small in memory", ARROW_BATCH_CONF, limit, current)
        spark.conf.set(ARROW_BATCH_CONF, str(limit))


class WorkerModel:
    """A built Keras backbone plus its input size and ``preprocess_input``."""

    def __init__(self, model_name: str, weights: str, pooling: str, seed: int, precision: str = "float32"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        configure_tf_threads()
        import keras

        backbone = get_backbone(model_name)
        self.size = backbone.input_size
        self.preprocess = backbone.preprocess_input()
        path = resolve_weights(backbone, weights)
        if path is None:
            keras.utils.set_random_seed(seed)  # identical random weights in every worker
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
        try:
            base = backbone.keras_constructor()(
                include_top=False,
                weights=None if path is None else str(path),
                input_shape=(self.size, self.size, 3),
                pooling="avg" if pooling == "avg" else None,
            )
            if pooling == "flatten":
                base = keras.Model(base.inputs, keras.layers.Flatten()(base.outputs[0]), name=base.name + "_flatten")
            elif pooling in MULTI_LAYER_POOLINGS:
                base = _multi_layer_model(keras, base, backbone.block_layers(pooling), pooling)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        self.model = base
        self.dim = backbone.feature_dim(pooling)
        self.pooling = pooling
        self._both = None

    def decode(self, item, name, kind: str, view: str = FULL) -> np.ndarray:
        """One image (file bytes, or Spark's image struct for ``kind`` "struct") as the backbone's input array."""
        if kind == "struct":
            return imagelib.from_image_struct(item, self.size, view)
        return imagelib.decode(item, self.size, name, view)

    def features(
        self, images, names: pd.Series, kind: str, batch_size: int, view: str = FULL, flips: bool = False
    ) -> np.ndarray:
        """The features of a batch of images; ``flips``: the mean of the picture's and its mirror image's."""
        rows = images.to_dict("records") if kind == "struct" else list(images)
        names = [n if isinstance(n, str) else f"row {i}" for i, n in enumerate(names)]
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for start in range(0, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            x = self.preprocess(np.stack([self.decode(rows[i], names[i], kind, view) for i in range(start, stop)]))
            feats = np.asarray(self.model.predict_on_batch(x), dtype=np.float32)
            if flips:
                mirrored = np.asarray(self.model.predict_on_batch(x[:, :, ::-1, :].copy()), dtype=np.float32)
                feats = (feats + mirrored) / 2
            out[start:stop] = feats
        return out

    def features_and_grids(
        self, images, names: pd.Series, kind: str, batch_size: int, view: str = FULL, flips: bool = False
    ) -> tuple[np.ndarray, list[Grid]]:
        """``features`` (the same values) and, from the same forward pass, each image's ``Grid``: what its class
        activation map under any LR on these features is computed from (``avg`` pooling only)."""
        from covidct.data.body import body_mask, grid_share

        if self.pooling != "avg":
            raise ValueError(f"grids exist for avg pooling only, not {self.pooling}")
        if self._both is None:
            import keras

            self._both = keras.Model(self.model.inputs, [self.model.layers[-1].input, self.model.output],
                                     name=self.model.name + "_grids")  # fmt: skip
        rows = images.to_dict("records") if kind == "struct" else list(images)
        names = [n if isinstance(n, str) else f"row {i}" for i, n in enumerate(names)]
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        grids: list[Grid] = []
        for start in range(0, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            pictures = np.stack([self.decode(rows[i], names[i], kind, view) for i in range(start, stop)])
            masks = [body_mask(p).mask for p in pictures]
            x = self.preprocess(pictures.copy())
            conv, feats = self._both.predict_on_batch(x)
            conv, feats = np.asarray(conv, dtype=np.float32), np.asarray(feats, dtype=np.float32)
            if flips:  # the mirror image's block, mirrored back: the features' mean is this block's mean
                mirrored_conv, mirrored = self._both.predict_on_batch(x[:, :, ::-1, :].copy())
                conv = (conv + np.asarray(mirrored_conv, dtype=np.float32)[:, :, ::-1, :]) / 2
                feats = (feats + np.asarray(mirrored, dtype=np.float32)) / 2
            out[start:stop] = feats
            shape = conv.shape[1:3]
            grids.extend(Grid.of(c, grid_share(m, shape)) for c, m in zip(conv, masks, strict=True))
        return out, grids


def _multi_layer_model(keras, base, blocks: tuple[tuple[str, int], ...], pooling: str):
    """One model whose output is the global pools of several block outputs, concatenated.

    Layout: all blocks' averages (in ``blocks`` order), then all blocks' maxima for ``avgmax``.
    One forward pass computes every block (the deeper blocks reuse the shallower ones).
    """
    pools = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    outputs = [
        pools[op](name=f"{op}_{layer}")(base.get_layer(layer).output)
        for op in MULTI_LAYER_POOLINGS[pooling]
        for layer, _ in blocks
    ]
    return keras.Model(base.inputs, keras.layers.Concatenate(name=pooling)(outputs), name=f"{base.name}_{pooling}")


_MODELS: WorkerCache[WorkerModel] = WorkerCache()


def worker_model(model_name: str, weights: str, pooling: str, seed: int, precision: str = "float32") -> WorkerModel:
    """The worker's model for these params, built on first use and then reused across tasks."""
    return _MODELS.get(
        model_key(model_name, weights, pooling, seed, precision),
        lambda: WorkerModel(model_name, weights, pooling, seed, precision),
    )


def configure_tf_threads() -> None:
    """TensorFlow gets the task's cores (spark.task.cpus); COVIDCT_TF_THREADS overrides."""
    threads = os.environ.get("COVIDCT_TF_THREADS")
    if not threads:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        threads = ctx.cpus() if ctx is not None else 0  # 0 = TensorFlow's default (all cores)
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(min(int(threads), 2) if int(threads) else 0)
    except RuntimeError:  # TensorFlow already initialised in this process: keep its setting
        pass
