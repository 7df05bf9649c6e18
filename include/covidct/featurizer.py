"""``DeepImageFeaturizer``: sparkdl's featurizer rebuilt on Spark 4 + Keras 3.

A ``pyspark.ml`` Transformer that turns an image column into a feature vector with a
frozen ImageNet CNN, so the reference study's code runs unchanged::

    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="VGG16")
    lr = LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3, labelCol="label")
    p_model = Pipeline(stages=[featurizer, lr]).fit(trainDF)

The input column holds either the raw file bytes (``binaryFile`` source, as
``covidct.dataset`` loads it) or Spark's image struct (``spark.read.format("image")``).
Keras runs in the Python workers through an iterator pandas UDF: the model is built
once per worker process and reused across tasks, images go through it in batches of
``batchSize``, and TensorFlow uses as many threads as the task has cores
(``spark.task.cpus``). Defining or saving the stage never imports TensorFlow on the
driver. An image that cannot be decoded fails the job with an error naming the file
(the ``path`` column, when the DataFrame has one).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasOutputCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, BinaryType, FloatType, StructType

from covidct import image as imagelib
from covidct.backbone import (
    MULTI_LAYER_POOLINGS,
    POOLINGS,
    PRECISIONS,
    get_backbone,
    normalize_weights,
    resolve_weights,
)
from covidct.errors import CovidctError

log = logging.getLogger(__name__)

ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"
#: Rows per Arrow batch the featurizer allows (Spark's default, 10,000 image rows, is GBs).
MAX_ARROW_ROWS = 256
IMAGE_STRUCT_FIELDS = {"origin", "height", "width", "nChannels", "mode", "data"}


def _to_model_name(value) -> str:
    try:
        return get_backbone(TypeConverters.toString(value)).name
    except CovidctError as exc:  # pyspark reports invalid param values as TypeError
        raise TypeError(str(exc)) from None


def _to_pooling(value) -> str:
    value = TypeConverters.toString(value).lower()
    if value not in POOLINGS:
        raise TypeError(f"pooling must be one of {POOLINGS}, got {value!r}")
    return value


def _to_precision(value) -> str:
    value = TypeConverters.toString(value).lower()
    if value not in PRECISIONS:
        raise TypeError(f"precision must be one of {PRECISIONS}, got {value!r}")
    return value


def _to_weights(value) -> str:
    return normalize_weights(None if value is None else TypeConverters.toString(value))


class DeepImageFeaturizer(Transformer, HasInputCol, HasOutputCol, DefaultParamsReadable, DefaultParamsWritable):
    """Featurizes images with a frozen ImageNet backbone; output is a ``DenseVector`` column."""

    modelName = Param(
        Params._dummy(), "modelName", "backbone: VGG16, VGG19, Xception, ResNet50 or InceptionV3", _to_model_name
    )
    pooling = Param(
        Params._dummy(),
        "pooling",
        "'avg': global average pooling of the last conv block (512 dims for VGG, 2048 otherwise); "
        "'flatten': the whole last conv block flattened, as sparkdl did (25,088 dims for VGG, 204,800 for Xception); "
        "'avg-b345': global average pools of conv blocks 3, 4, 5 concatenated (1,280 dims for VGG, 3,584 for "
        "ResNet50); 'avgmax-b345': those averages, then the blocks' global max pools (2,560 / 7,168 dims); "
        "the multi-layer poolings exist for VGG16, VGG19 and ResNet50",
        _to_pooling,
    )
    weights = Param(
        Params._dummy(),
        "weights",
        "'imagenet' (from $COVIDCT_WEIGHTS_DIR, then Keras' cache/download), a path to a weights file, "
        "or 'none' for seeded random weights",
        _to_weights,
    )
    precision = Param(
        Params._dummy(),
        "precision",
        "'float32' (default, faithful) or 'bfloat16' (mixed_bfloat16: ~2x faster on CPUs with AVX512_BF16/AMX, "
        "features within ~1 %)",
        _to_precision,
    )
    batchSize = Param(Params._dummy(), "batchSize", "images per Keras forward pass (> 0)", TypeConverters.toInt)
    seed = Param(Params._dummy(), "seed", "seed of the random weights when weights='none'", TypeConverters.toInt)

    @keyword_only
    def __init__(
        self,
        *,
        inputCol: str = "image",
        outputCol: str = "features",
        modelName: str = "VGG16",
        pooling: str = "avg",
        weights: str | None = "imagenet",
        precision: str = "float32",
        batchSize: int = 32,
        seed: int = 0,
    ):
        super().__init__()
        self._setDefault(
            inputCol="image", outputCol="features", modelName="VGG16", pooling="avg", weights="imagenet",
            precision="float32", batchSize=32, seed=0,
        )  # fmt: skip
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        inputCol: str = "image",
        outputCol: str = "features",
        modelName: str = "VGG16",
        pooling: str = "avg",
        weights: str | None = "imagenet",
        precision: str = "float32",
        batchSize: int = 32,
        seed: int = 0,
    ) -> DeepImageFeaturizer:
        kwargs = dict(self._input_kwargs)
        if "weights" in kwargs:  # pyspark stores None unconverted; None means random weights here
            kwargs["weights"] = _to_weights(kwargs["weights"])
        if "batchSize" in kwargs and int(kwargs["batchSize"]) <= 0:
            raise ValueError(f"batchSize must be > 0, got {kwargs['batchSize']}")
        return self._set(**kwargs)

    def setInputCol(self, value: str) -> DeepImageFeaturizer:
        return self._set(inputCol=value)

    def setOutputCol(self, value: str) -> DeepImageFeaturizer:
        return self._set(outputCol=value)

    def setModelName(self, value: str) -> DeepImageFeaturizer:
        return self._set(modelName=value)

    def getModelName(self) -> str:
        return self.getOrDefault(self.modelName)

    def setPooling(self, value: str) -> DeepImageFeaturizer:
        return self._set(pooling=value)

    def getPooling(self) -> str:
        return self.getOrDefault(self.pooling)

    def setWeights(self, value: str | None) -> DeepImageFeaturizer:
        return self._set(weights=_to_weights(value))

    def getWeights(self) -> str:
        return self.getOrDefault(self.weights)

    def setPrecision(self, value: str) -> DeepImageFeaturizer:
        return self._set(precision=value)

    def getPrecision(self) -> str:
        return self.getOrDefault(self.precision)

    def setBatchSize(self, value: int) -> DeepImageFeaturizer:
        return self.setParams(batchSize=value)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def setSeed(self, value: int) -> DeepImageFeaturizer:
        return self._set(seed=value)

    def getSeed(self) -> int:
        return self.getOrDefault(self.seed)

    def featureDim(self) -> int:
        """Length of the output vectors (known without building the model).

        Raises CovidctError for a multi-layer pooling the backbone does not define.
        """
        return get_backbone(self.getModelName()).feature_dim(self.getPooling())

    def featureArrays(self, dataset: DataFrame) -> Column:
        """The features as ``array<float>`` (compact; what the feature cache stores)."""
        self.featureDim()  # on the driver: a pooling the backbone lacks fails here, not in a worker
        input_col = self.getInputCol()
        if input_col not in dataset.columns:
            raise ValueError(f"input column {input_col!r} not in the DataFrame (columns: {dataset.columns})")
        dtype = dataset.schema[input_col].dataType
        if isinstance(dtype, BinaryType):
            kind = "bytes"
        elif isinstance(dtype, StructType) and set(dtype.fieldNames()) >= IMAGE_STRUCT_FIELDS:
            kind = "struct"
        else:
            raise ValueError(
                f"input column {input_col!r} must hold image file bytes (binary) or Spark's image struct, "
                f"not {dtype.simpleString()}"
            )
        _bound_arrow_batches(dataset, self.getBatchSize())
        names = F.col("path") if "path" in dataset.columns else F.lit(None).cast("string")
        udf = _featurize_udf(
            kind,
            self.getModelName(),
            self.getWeights(),
            self.getPooling(),
            self.getPrecision(),
            self.getBatchSize(),
            self.getSeed(),
        )
        return udf(F.col(input_col), names)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        return dataset.withColumn(self.getOutputCol(), array_to_vector(self.featureArrays(dataset)))


def _bound_arrow_batches(dataset: DataFrame, batch_size: int) -> None:
    spark = dataset.sparkSession
    limit = max(batch_size, MAX_ARROW_ROWS)
    current = int(spark.conf.get(ARROW_BATCH_CONF, "10000"))
    if current <= 0 or current > limit:
        log.info("setting %s=%d (was %d) so image batches stay small in memory", ARROW_BATCH_CONF, limit, current)
        spark.conf.set(ARROW_BATCH_CONF, str(limit))


def _featurize_udf(
    kind: str, model_name: str, weights: str, pooling: str, precision: str, batch_size: int, seed: int
):  # fmt: skip
    @F.pandas_udf(ArrayType(FloatType()))
    def featurize(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        model = worker_model(model_name, weights, pooling, seed, precision)
        for images, names in batches:
            yield pd.Series(list(model.features(images, names, kind, batch_size)))

    return featurize


# --------------------------------------------------------------------------- worker side


class WorkerModel:
    """A built Keras backbone plus its input size and ``preprocess_input``."""

    def __init__(self, model_name: str, weights: str, pooling: str, seed: int, precision: str = "float32"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _configure_tf_threads()
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

    def _decode(self, item, name, kind: str) -> np.ndarray:
        if kind == "struct":
            return imagelib.from_image_struct(item, self.size)
        return imagelib.decode(item, self.size, name)

    def features(self, images, names: pd.Series, kind: str, batch_size: int) -> np.ndarray:
        rows = images.to_dict("records") if kind == "struct" else list(images)
        names = [n if isinstance(n, str) else f"row {i}" for i, n in enumerate(names)]
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for start in range(0, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            batch = np.stack([self._decode(rows[i], names[i], kind) for i in range(start, stop)])
            out[start:stop] = np.asarray(self.model.predict_on_batch(self.preprocess(batch)), dtype=np.float32)
        return out


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


_MODELS: OrderedDict[tuple, WorkerModel] = OrderedDict()
_MODELS_LOCK = threading.Lock()
_MAX_MODELS = 2


def worker_model(model_name: str, weights: str, pooling: str, seed: int, precision: str = "float32") -> WorkerModel:
    """The worker's model for these params, built on first use and then reused across tasks."""
    key = (model_name, weights, pooling, precision, seed if weights == "none" else None)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        model = WorkerModel(model_name, weights, pooling, seed, precision)
        _MODELS[key] = model
        while len(_MODELS) > _MAX_MODELS:
            _MODELS.popitem(last=False)
        return model


def _configure_tf_threads() -> None:
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
