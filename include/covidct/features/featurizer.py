"""``DeepImageFeaturizer``: sparkdl's featurizer rebuilt on Spark 4 + Keras 3.

A ``pyspark.ml`` Transformer that turns an image column into a feature vector with a
frozen ImageNet CNN, so the reference study's code runs unchanged::

    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="VGG16")
    lr = LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3, labelCol="label")
    p_model = Pipeline(stages=[featurizer, lr]).fit(trainDF)

The input column holds either the raw file bytes (``binaryFile`` source, as
``covidct.data.dataset`` loads it) or Spark's image struct (``spark.read.format("image")``).
Keras runs in the Python workers through an iterator pandas UDF: the model is built
once per worker process and reused across tasks, images go through it in batches of
``batchSize``, and TensorFlow uses as many threads as the task has cores
(``spark.task.cpus``). The DataFrame's partitions are the tasks: a few large or uneven ones leave
cores idle in the last round (``repartition`` to a multiple of the cores; docs/performance.md).
Defining or saving the stage never imports TensorFlow on the driver. ``view`` shows the backbone the
whole picture or only the body (``covidct.data.body``) and
``flips`` averages each image's features with its mirror image's; both are saved with the stage, so a
saved model applies them to new images. An image that cannot be decoded fails the job with an error
naming the file (the ``path`` column, when the DataFrame has one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

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

from covidct.core.errors import CovidctError
from covidct.data.body import VIEWS
from covidct.data.image import preprocessing_id
from covidct.features.backbone import (
    POOLINGS,
    PRECISIONS,
    get_backbone,
    normalize_weights,
)
from covidct.features.workers import bound_arrow_batches, worker_model

log = logging.getLogger(__name__)

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


def _to_view(value) -> str:
    value = TypeConverters.toString(value).lower()
    if value not in VIEWS:
        raise TypeError(f"view must be one of {VIEWS}, got {value!r}")
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
    view = Param(
        Params._dummy(),
        "view",
        "what the backbone sees: 'full' (the whole picture), 'body' (cropped to the body's bounding box) or "
        "'body-blank' (cropped, and black outside the body); covidct.data.body",
        _to_view,
    )
    flips = Param(
        Params._dummy(),
        "flips",
        "test-time flips: the features are the mean of the picture's and its mirror image's (twice the passes)",
        TypeConverters.toBoolean,
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
        view: str = "full",
        flips: bool = False,
        batchSize: int = 32,
        seed: int = 0,
    ):
        super().__init__()
        self._setDefault(
            inputCol="image", outputCol="features", modelName="VGG16", pooling="avg", weights="imagenet",
            precision="float32", view="full", flips=False, batchSize=32, seed=0,
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
        view: str = "full",
        flips: bool = False,
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

    def setView(self, value: str) -> DeepImageFeaturizer:
        return self._set(view=value)

    def getView(self) -> str:
        return self.getOrDefault(self.view)

    def setFlips(self, value: bool) -> DeepImageFeaturizer:
        return self._set(flips=value)

    def getFlips(self) -> bool:
        return self.getOrDefault(self.flips)

    def preprocessing(self) -> str:
        """What the backbone is shown (``covidct.data.image.preprocessing_id``): the feature cache's key."""
        return preprocessing_id(self.getView(), self.getFlips())

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
        return self._udf(dataset, grids=False)

    def featureRecords(self, dataset: DataFrame) -> Column:
        """``struct<features, grid, grid_shape, inside>``: the features and, from the same forward pass, what any
        LR's class activation map on them is computed from (``covidct.features.workers.Grid``: the last conv
        block, half precision, and each cell's share inside the body). ``avg`` pooling only; what the feature
        cache stores, so that the evidence and the report's maps need no second pass over the images."""
        if self.getPooling() != "avg":
            raise ValueError(f"grids exist for avg pooling only, not {self.getPooling()}")
        return self._udf(dataset, grids=True)

    def _udf(self, dataset: DataFrame, grids: bool) -> Column:
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
        bound_arrow_batches(dataset, self.getBatchSize())
        names = F.col("path") if "path" in dataset.columns else F.lit(None).cast("string")
        params = (kind, self.getModelName(), self.getWeights(), self.getPooling(), self.getPrecision(),
                  self.getBatchSize(), self.getSeed(), self.getView(), self.getFlips())  # fmt: skip
        udf = _records_udf(*params) if grids else _featurize_udf(*params)
        return udf(F.col(input_col), names)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        return dataset.withColumn(self.getOutputCol(), array_to_vector(self.featureArrays(dataset)))


def _featurize_udf(
    kind: str, model_name: str, weights: str, pooling: str, precision: str, batch_size: int, seed: int, view: str,
    flips: bool,
):  # fmt: skip
    @F.pandas_udf(ArrayType(FloatType()))
    def featurize(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        model = worker_model(model_name, weights, pooling, seed, precision)
        for images, names in batches:
            yield pd.Series(list(model.features(images, names, kind, batch_size, view, flips)))

    return featurize


RECORD_SCHEMA = "features array<float>, grid binary, grid_shape array<int>, inside array<float>"


def _records_udf(
    kind: str, model_name: str, weights: str, pooling: str, precision: str, batch_size: int, seed: int, view: str,
    flips: bool,
):  # fmt: skip
    @F.pandas_udf(RECORD_SCHEMA)
    def featurize(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        model = worker_model(model_name, weights, pooling, seed, precision)
        for images, names in batches:
            feats, grids = model.features_and_grids(images, names, kind, batch_size, view, flips)
            records = [g.to_record() for g in grids]
            yield pd.DataFrame({"features": list(feats), "grid": [r["grid"] for r in records],
                                "grid_shape": [r["grid_shape"] for r in records],
                                "inside": [r["inside"] for r in records]})  # fmt: skip

    return featurize
