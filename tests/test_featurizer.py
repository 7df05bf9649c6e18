"""DeepImageFeaturizer on a real local SparkSession (random weights: mechanics, not accuracy)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import MulticlassClassificationEvaluator

from covidct.data.dataset import load_images
from covidct.features.featurizer import DeepImageFeaturizer
from covidct.features.workers import ARROW_BATCH_CONF

BACKBONE_DIMS = {
    "VGG16": (512, 25088),
    "VGG19": (512, 25088),
    "Xception": (2048, 204800),
    "ResNet50": (2048, 100352),
    "InceptionV3": (2048, 131072),
}


@pytest.fixture(scope="module")
def images(spark, small_dataset):
    return load_images(spark, small_dataset).cache()


@pytest.fixture(scope="module")
def two_images(images):
    return images.orderBy("relpath").limit(2).cache()


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(BACKBONE_DIMS))
def test_output_dimensions_per_backbone_and_pooling(two_images, model_name):
    for pooling, expected in zip(("avg", "flatten"), BACKBONE_DIMS[model_name], strict=True):
        featurizer = DeepImageFeaturizer(modelName=model_name, weights="none", pooling=pooling)
        assert featurizer.featureDim() == expected
        rows = featurizer.transform(two_images).select("relpath", "features").collect()
        assert len(rows) == 2
        assert {r.features.size for r in rows} == {expected}
        assert all(np.isfinite(r.features.toArray()).all() for r in rows)


def test_the_studys_pipeline_code_runs_unchanged(images):
    trainDF, testDF = images.randomSplit([0.7, 0.3], seed=3)  # noqa: N806 - the study's names
    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="VGG16", weights="none")
    lr = LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3, labelCol="label")
    p_model = Pipeline(stages=[featurizer, lr]).fit(trainDF)
    tested_df = p_model.transform(testDF)
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    accuracy = evaluator.evaluate(tested_df.select("prediction", "label"))
    # The two synthetic classes differ strongly: even random conv features separate them.
    assert accuracy >= 0.75
    assert tested_df.count() == testDF.count()


@pytest.mark.slow
def test_pipeline_model_save_and_load_gives_identical_predictions(images, tmp_path):
    featurizer = DeepImageFeaturizer(modelName="VGG19", weights="none", pooling="avg", batchSize=4, seed=5)
    lr = LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3)
    model = Pipeline(stages=[featurizer, lr]).fit(images)
    model.save(str(tmp_path / "model"))
    loaded = PipelineModel.load(str(tmp_path / "model"))
    stage = loaded.stages[0]
    assert isinstance(stage, DeepImageFeaturizer)
    assert (stage.getModelName(), stage.getWeights(), stage.getBatchSize(), stage.getSeed()) == ("VGG19", "none", 4, 5)

    probes = images.orderBy("relpath").limit(6)  # fitted on all 24; six are enough to compare the two models

    def predict(m):
        rows = m.transform(probes).select("relpath", "probability", "prediction").collect()
        return {r.relpath: (r.prediction, r.probability.toArray()) for r in rows}

    # A model saved before the package had layers names its stage by the old path, which still loads.
    shutil.copytree(tmp_path / "model", tmp_path / "saved-before")
    (meta,) = (tmp_path / "saved-before" / "stages").glob("0_*/metadata/part-*")
    assert '"class":"covidct.features.featurizer.DeepImageFeaturizer"' in meta.read_text()
    meta.write_text(meta.read_text().replace("covidct.features.featurizer.", "covidct.featurizer."))
    meta.with_name(f".{meta.name}.crc").unlink()  # Hadoop's checksum of the old bytes; none is checked then
    older = PipelineModel.load(str(tmp_path / "saved-before"))
    assert isinstance(older.stages[0], DeepImageFeaturizer)

    before, after, old = predict(model), predict(loaded), predict(older)
    assert before.keys() == after.keys() == old.keys() and len(before) == 6
    for key, (prediction, probability) in before.items():
        assert after[key][0] == old[key][0] == prediction
        np.testing.assert_allclose(after[key][1], probability, rtol=0, atol=1e-6)
        np.testing.assert_allclose(old[key][1], probability, rtol=0, atol=1e-6)


def test_random_weights_are_identical_in_every_worker(spark, images):
    # The same image in two partitions (two Python workers under local[2]) gets the same features.
    one = images.orderBy("relpath").limit(1)
    spread = one.unionByName(one).unionByName(one).unionByName(one).repartition(4)
    rows = DeepImageFeaturizer(modelName="VGG16", weights="none").transform(spread).collect()
    arrays = [r.features.toArray() for r in rows]
    for other in arrays[1:]:
        np.testing.assert_array_equal(arrays[0], other)


def test_image_struct_input_gives_the_same_features_as_file_bytes(spark, small_dataset, images):
    featurizer = DeepImageFeaturizer(modelName="VGG16", weights="none", outputCol="f")
    # Spark's image source (what sparkdl's readImages returned) decodes PNG; JPEG decoders differ.
    pngs = [r.relpath for r in images.collect() if r.image[:4] == b"\x89PNG"][:3]
    struct_df = spark.read.format("image").load([str(small_dataset / p) for p in pngs])
    from_struct = {r.image.origin.rsplit("/", 1)[-1]: r.f.toArray() for r in featurizer.transform(struct_df).collect()}
    from_bytes = {
        r.relpath.split("/")[1]: r.f.toArray()
        for r in featurizer.transform(images.filter(images.relpath.isin(pngs))).collect()
    }
    from urllib.parse import unquote

    from_struct = {unquote(k): v for k, v in from_struct.items()}
    assert from_struct.keys() == from_bytes.keys() and len(from_bytes) == 3
    for name, features in from_bytes.items():
        np.testing.assert_allclose(from_struct[name], features, atol=1e-5)


def test_bfloat16_precision_is_close_to_float32(two_images):
    def features(precision):
        featurizer = DeepImageFeaturizer(modelName="VGG16", weights="none", precision=precision)
        return {r.relpath: r.features.toArray() for r in featurizer.transform(two_images).collect()}

    full, half = features("float32"), features("bfloat16")
    for key, value in full.items():
        assert not np.array_equal(half[key], value)  # really computed in bfloat16
        assert np.abs(half[key] - value).mean() < 0.03 * np.abs(value).mean()


def test_arrow_batches_are_bounded(spark, two_images):
    spark.conf.set(ARROW_BATCH_CONF, "10000")
    DeepImageFeaturizer(modelName="VGG16", weights="none", batchSize=8).transform(two_images)
    assert int(spark.conf.get(ARROW_BATCH_CONF)) <= 256


def test_undecodable_file_fails_naming_the_file(spark, small_dataset, tmp_path):
    data = tmp_path / "CT_COVID"
    data.mkdir()
    good = next((small_dataset / "CT_COVID").iterdir())
    (data / good.name).write_bytes(good.read_bytes())
    (data / "broken%0.png").write_bytes(good.read_bytes()[:200])
    df = spark.read.format("binaryFile").load(str(data)).withColumnRenamed("content", "image")
    with pytest.raises(Exception, match=r"ImageDecodeError: cannot decode image \S*broken%0\.png"):
        DeepImageFeaturizer(modelName="VGG16", weights="none").transform(df).collect()


def test_params_behave_like_a_builtin_stage():
    featurizer = DeepImageFeaturizer(modelName="xception", weights=None)
    assert featurizer.getModelName() == "Xception"
    assert featurizer.getWeights() == "none"
    assert "modelName" in featurizer.explainParams()
    with pytest.raises(TypeError, match="unknown backbone"):
        DeepImageFeaturizer(modelName="AlexNet")
    with pytest.raises(TypeError, match="pooling"):
        DeepImageFeaturizer(pooling="max")
    with pytest.raises(TypeError, match="precision"):
        DeepImageFeaturizer(precision="float16")
    with pytest.raises(ValueError, match="batchSize"):
        DeepImageFeaturizer(batchSize=0)
    with pytest.raises(ValueError, match="input column 'img'"):
        DeepImageFeaturizer(inputCol="img").featureArrays(_FakeFrame())


class _FakeFrame:
    columns = ["image"]


def test_defining_transforming_and_saving_never_imports_tensorflow_on_the_driver(small_dataset, tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from covidct.core.session import get_spark
        from covidct.data.dataset import load_images
        from covidct.features.featurizer import DeepImageFeaturizer
        spark = get_spark("no-tf")
        df = load_images(spark, {str(small_dataset)!r})
        featurizer = DeepImageFeaturizer(modelName="Xception", weights="none")
        out = featurizer.transform(df)
        featurizer.save({str(tmp_path / "stage")!r})
        DeepImageFeaturizer.load({str(tmp_path / "stage")!r})
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "TF imported on the driver"
        print("OK", out.schema["features"].dataType.simpleString())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK vector" in result.stdout


@pytest.mark.slow
def test_weights_file_path_loads_those_weights(images, tmp_path):
    import keras

    keras.utils.set_random_seed(11)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg")
    path = tmp_path / "vgg16.weights.h5"
    model.save_weights(str(path))
    one = images.orderBy("relpath").limit(1)
    from_file = DeepImageFeaturizer(modelName="VGG16", weights=str(path)).transform(one).first().features
    same_seed = DeepImageFeaturizer(modelName="VGG16", weights="none", seed=11).transform(one).first().features
    other_seed = DeepImageFeaturizer(modelName="VGG16", weights="none", seed=12).transform(one).first().features
    np.testing.assert_allclose(from_file.toArray(), same_seed.toArray(), atol=1e-5)
    assert not np.allclose(from_file.toArray(), other_seed.toArray())
