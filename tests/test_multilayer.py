"""Multi-layer poolings (avg-b345, avgmax-b345) on a real local Spark with random weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowFailException
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression

from covidct.cli import main
from covidct.core.errors import CovidctError
from covidct.data import image as imagelib
from covidct.data.dataset import load_images
from covidct.features.backbone import BACKBONES, MULTI_LAYER_POOLINGS, POOLINGS, get_backbone, weights_identity
from covidct.features.cache import CacheKey, FeatureCache
from covidct.features.featurizer import DeepImageFeaturizer
from covidct.modelling.train import TrainConfig, featurize
from covidct.orchestration import pipeline

#: pooling -> dims for the backbones with blocks 3, 4, 5 in the table.
DIMS = {
    "VGG16": {"avg": 512, "avg-b345": 256 + 512 + 512, "avgmax-b345": 2 * 1280},
    "VGG19": {"avg": 512, "avg-b345": 1280, "avgmax-b345": 2560},
    "ResNet50": {"avg": 2048, "avg-b345": 512 + 1024 + 2048, "avgmax-b345": 2 * 3584},
}


@pytest.fixture(scope="module")
def images(spark, small_dataset):
    return load_images(spark, small_dataset).cache()


@pytest.fixture(scope="module")
def two_images(images):
    return images.orderBy("relpath").limit(2).cache()


def features(df, model_name, pooling, seed=0):
    featurizer = DeepImageFeaturizer(modelName=model_name, weights="none", pooling=pooling, seed=seed)
    return {r.relpath: r.features.toArray() for r in featurizer.transform(df).select("relpath", "features").collect()}


# --------------------------------------------------------------------------- the table


def test_poolings_and_dims_come_from_the_backbone_table():
    assert POOLINGS == ("avg", "flatten", "avg-b345", "avgmax-b345")
    for name, dims in DIMS.items():
        for pooling, dim in dims.items():
            assert get_backbone(name).feature_dim(pooling) == dim, (name, pooling)
    # The last block is the layer plain avg pools: its channels are the avg dims.
    for backbone in BACKBONES.values():
        if backbone.blocks:
            assert backbone.blocks[-1][1] == backbone.feature_dim("avg")


@pytest.mark.parametrize("name", ["Xception", "InceptionV3"])
@pytest.mark.parametrize("pooling", list(MULTI_LAYER_POOLINGS))
def test_backbones_without_blocks_refuse_naming_the_supported_ones(name, pooling):
    message = rf"pooling '{pooling}' is defined for VGG16, VGG19, ResNet50, not for {name}"
    with pytest.raises(CovidctError, match=message):
        get_backbone(name).feature_dim(pooling)
    with pytest.raises(CovidctError, match=message):
        TrainConfig(data_dir=".", backbone=name, out="out", pooling=pooling)
    with pytest.raises(CovidctError, match=message):  # on the driver, before any Spark job
        DeepImageFeaturizer(modelName=name, pooling=pooling).featureArrays(_FakeFrame())
    assert get_backbone(name).feature_dim("avg") == 2048  # its other poolings still work


class _FakeFrame:
    columns = ["image"]


def test_cli_refuses_with_one_error_line(tmp_path, capsys):
    args = ["train", "--data", str(tmp_path), "--backbone", "Xception", "--pooling", "avgmax-b345"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: pooling 'avgmax-b345' is defined for VGG16, VGG19, ResNet50")
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as info:  # argparse's choices come from POOLINGS
        main(["train", "--data", ".", "--backbone", "VGG16", "--out", "o", "--pooling", "max-b345"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- features on Spark


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["VGG16", "ResNet50"])
def test_dims_and_layout_the_block5_average_is_exactly_plain_avg(two_images, model_name):
    avg = features(two_images, model_name, "avg")
    multi = features(two_images, model_name, "avg-b345")
    both = features(two_images, model_name, "avgmax-b345")
    dims = DIMS[model_name]
    n, last = dims["avg-b345"], dims["avg"]
    assert avg.keys() == multi.keys() == both.keys() and len(avg) == 2
    for key in avg:
        assert (multi[key].size, both[key].size) == (n, dims["avgmax-b345"])
        assert np.isfinite(both[key]).all()
        # The concatenation holds exactly what avg gives, as its block-5 part ...
        np.testing.assert_array_equal(multi[key][n - last :], avg[key])
        # ... and avgmax-b345 is avg-b345 followed by the same blocks' maxima.
        np.testing.assert_array_equal(both[key][:n], multi[key])
        maxima = both[key][n:]
        assert (maxima >= multi[key] - 1e-6).all() and (maxima > multi[key] + 1e-3).any()


@pytest.mark.slow
def test_each_part_is_the_global_pool_of_its_block(small_dataset, two_images):
    """Blocks 3, 4, 5 pooled by hand from the Keras model with the same seeded weights."""
    import keras

    got = features(two_images, "VGG19", "avgmax-b345", seed=4)
    backbone = get_backbone("VGG19")
    keras.utils.set_random_seed(4)
    model = backbone.keras_constructor()(include_top=False, weights=None, input_shape=(224, 224, 3))
    probe = keras.Model(model.inputs, [model.get_layer(layer).output for layer, _ in backbone.blocks])
    for relpath, vector in got.items():
        path = small_dataset / relpath
        x = backbone.preprocess_input()(imagelib.decode(path.read_bytes(), 224, str(path))[None].copy())
        maps = [np.asarray(m)[0] for m in probe.predict_on_batch(x)]
        expected = np.concatenate([m.mean(axis=(0, 1)) for m in maps] + [m.max(axis=(0, 1)) for m in maps])
        assert [m.shape[-1] for m in maps] == [256, 512, 512]
        np.testing.assert_allclose(vector, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_cached_under_its_own_key(spark, images, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    one = images.orderBy("relpath").limit(3)
    weights_id = weights_identity(get_backbone("VGG16"), "none", 0)
    folders, got = {}, {}
    for pooling in ("avg", "avg-b345", "avgmax-b345"):
        featurizer = DeepImageFeaturizer(modelName="VGG16", weights="none", pooling=pooling)
        key = CacheKey("VGG16", weights_id, pooling)
        feats, stats = featurize(spark, one, featurizer, cache, key)
        assert (stats["hits"], stats["misses"]) == (0, 3), pooling  # never another pooling's features
        got[pooling] = {r.sha256: np.array(r.features) for r in feats.collect()}
        folders[pooling] = cache.folder(key)
        _, stats = featurize(spark, one, featurizer, cache, key)
        assert (stats["hits"], stats["misses"]) == (3, 0), pooling
    assert len(set(folders.values())) == 3 and folders["avgmax-b345"].parts[-3] == "avgmax-b345"
    assert {len(next(iter(v.values()))) for v in got.values()} == {512, 1280, 2560}
    assert sorted(r["pooling"] for r in cache.summary()) == ["avg", "avg-b345", "avgmax-b345"]


@pytest.mark.slow
def test_pipeline_model_save_and_load_keeps_the_pooling(images, tmp_path):
    featurizer = DeepImageFeaturizer(modelName="VGG16", weights="none", pooling="avgmax-b345", batchSize=5, seed=2)
    model = Pipeline(stages=[featurizer, LogisticRegression(maxIter=20, regParam=0.05)]).fit(images)
    assert model.stages[1].numFeatures == 2560
    model.save(str(tmp_path / "model"))
    loaded = PipelineModel.load(str(tmp_path / "model"))
    stage = loaded.stages[0]
    assert (stage.getPooling(), stage.featureDim(), stage.getBatchSize()) == ("avgmax-b345", 2560, 5)

    probes = images.orderBy("relpath").limit(6)  # fitted on all; six are enough to compare the two models

    def predict(m):
        return {r.relpath: r.probability.toArray() for r in m.transform(probes).collect()}

    before, after = predict(model), predict(loaded)
    assert before.keys() == after.keys() and len(before) == 6
    for key, probability in before.items():
        np.testing.assert_allclose(after[key], probability, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- DAG


def test_dag_param_offers_the_multi_layer_poolings_and_says_what_they_are(dag):
    param = dag.params.get_param("pooling")
    assert param.schema["enum"] == list(POOLINGS)
    assert "blocks 3, 4 and 5" in param.description and "avgmax-b345" in param.description
    for pooling in MULTI_LAYER_POOLINGS:
        candidate = copy.deepcopy(dag.params)
        candidate.update({"pooling": pooling})
        assert candidate.validate()["pooling"] == pooling


def test_selecting_a_backbone_without_blocks_fails_before_any_spark_job():
    assert pipeline.select_backbones(["VGG16", "VGG19"], "avgmax-b345") == ["train_vgg16", "train_vgg19"]
    assert pipeline.select_backbones(["Xception"], "avg") == ["train_xception"]
    with pytest.raises(AirflowFailException, match="not for Xception") as info:  # not retried
        pipeline.select_backbones(["VGG16", "Xception"], "avg-b345")
    assert isinstance(info.value.__cause__, CovidctError)


# A DAG run with a multi-layer pooling (the param reaching the job and its cache key): tests/test_dag.py,
# test_a_failed_backbone_still_gets_a_report_naming_it.
