"""The feature cache: hits, misses, invalidation, crash safety, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from covidct.cli import main
from covidct.data.dataset import load_images
from covidct.features import cache as cachelib
from covidct.features.backbone import get_backbone, weights_identity
from covidct.features.cache import CacheKey, FeatureCache
from covidct.features.featurizer import DeepImageFeaturizer
from covidct.modelling.train import featurize


@pytest.fixture(scope="module")
def images(spark, small_dataset):
    return load_images(spark, small_dataset).cache()


def run(spark, images, cache, pooling="avg", seed=0, precision="float32"):
    featurizer = DeepImageFeaturizer(modelName="VGG16", weights="none", pooling=pooling, seed=seed, precision=precision)
    key = CacheKey("VGG16", weights_identity(get_backbone("VGG16"), "none", seed), pooling, precision)
    feats, stats = featurize(spark, images, featurizer, cache, key)
    return {r.sha256: np.array(r.features) for r in feats.collect()}, stats, key


@pytest.mark.slow
def test_misses_then_hits_and_only_new_images_are_featurized(spark, images, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    first_half = images.filter("label = 1")
    first, stats, key = run(spark, first_half, cache)
    assert (stats["hits"], stats["misses"]) == (0, 12)
    both, stats, _ = run(spark, images, cache)
    assert (stats["hits"], stats["misses"]) == (12, 12)
    for sha, features in first.items():
        np.testing.assert_array_equal(both[sha], features)
    again, stats, _ = run(spark, images, cache)
    assert (stats["hits"], stats["misses"]) == (24, 0) and again.keys() == both.keys()
    assert cache.files(key) and not any(p.name.startswith(".staging") for p in cache.folder(key).iterdir())


def test_cached_hashes_are_read_without_spark_and_skip_an_unreadable_file(spark, images, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    cached, _, key = run(spark, images.limit(4), cache)
    (cache.folder(key) / "zz-broken.parquet").write_bytes(b"PAR1 not parquet")  # e.g. a disk that filled up
    assert cache.shas(key) == set(cached) and len(cached) == 4
    assert cache.read(spark, key).count() == 4  # Spark's reader skips it too (ignoreCorruptFiles)
    assert cache.shas(CacheKey("VGG19", "none", "avg")) == set()


def test_an_altered_or_truncated_cache_file_is_named_set_aside_and_its_images_featurized_again(
    spark, images, tmp_path, caplog
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = FeatureCache(tmp_path / "cache")
    run(spark, images.limit(2), cache)
    clean, _, key = run(spark, images.limit(5), cache)  # a second write: more than one file
    altered, truncated = cache.files(key)[0], cache.files(key)[-1]
    assert altered != truncated and all(cachelib._checksum_file(f).is_file() for f in (altered, truncated))
    lost = {f: set(pq.read_table(f).column("sha256").to_pylist()) for f in (altered, truncated)}
    table = pq.read_table(altered)  # a valid Parquet file with other values: only the checksum can tell
    features = [[v + 1.0 for v in row] for row in table.column("features").to_pylist()]
    pq.write_table(table.set_column(1, "features", pa.array(features, pa.list_(pa.float32()))), altered)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with caplog.at_level("WARNING", logger="covidct.features.cache"):
        again, stats, _ = run(spark, images.limit(5), cache)
    assert stats["misses"] == len(lost[altered] | lost[truncated]) and stats["misses"] + stats["hits"] == 5
    for sha, vector in clean.items():
        np.testing.assert_array_equal(again[sha], vector)  # equal to the clean run's
    for file in (altered, truncated):
        assert f"{file} " in caplog.text and (file.parent / f".corrupt-{file.name}").is_file() and not file.exists()
    assert "does not match its checksum" in caplog.text


@pytest.mark.slow
def test_other_pooling_or_weights_never_reuse_stale_features(spark, images, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    one = images.limit(3)
    base, stats, key = run(spark, one, cache)
    assert stats["misses"] == 3
    _, stats, flat_key = run(spark, one, cache, pooling="flatten")
    assert stats["misses"] == 3 and flat_key != key
    reseeded, stats, seed_key = run(spark, one, cache, seed=1)
    assert stats["misses"] == 3 and seed_key.weights_id == "random-seed1"
    assert not np.allclose(next(iter(base.values())), reseeded[next(iter(base))])
    _, stats, half_key = run(spark, one, cache, precision="bfloat16")
    assert stats["misses"] == 3
    assert len({cache.folder(k) for k in (key, flat_key, seed_key, half_key)}) == 4
    # The preprocessing version is part of every key too.
    assert key.parts()[-1] == cachelib.PREPROCESSING_VERSION


def test_a_failure_between_file_renames_leaves_complete_files_that_are_reused(spark, images, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    real_rename, calls = os.rename, []

    def flaky_rename(src, dst):
        calls.append(src)
        if len(calls) > 1:
            raise OSError("simulated crash")
        return real_rename(src, dst)

    monkeypatch.setattr(cachelib.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated crash"):
        run(spark, images.repartition(3), cache)
    monkeypatch.setattr(cachelib.os, "rename", real_rename)
    key = CacheKey("VGG16", "random-seed0", "avg")
    kept = spark.read.parquet(*[f.as_uri() for f in cache.files(key)]).count()
    assert 0 < kept < 24
    _, stats, _ = run(spark, images, cache)
    assert (stats["hits"], stats["misses"]) == (kept, 24 - kept)


@pytest.mark.slow
def test_a_job_killed_mid_write_leaves_a_usable_cache(small_dataset, tmp_path):
    cache_dir = tmp_path / "cache"
    args = [sys.executable, "-m", "covidct.cli", "train", "--data", str(small_dataset), "--backbone", "VGG16",
            "--weights", "none", "--cache-dir", str(cache_dir), "--stack-folds", "0"]  # fmt: skip
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600  # a hang guard: the job starts writing within ~1 min when idle
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(cache_dir.glob("**/.staging-*/*")):  # Spark has started writing features
                break
            time.sleep(0.05)
        else:
            pytest.fail("the job never started writing the cache")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "killed").exists()
    result = subprocess.run([*args, "--out", str(tmp_path / "after")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    m = json.loads((tmp_path / "after" / "metrics.json").read_text())
    assert m["cache"]["hits"] + m["cache"]["misses"] == 24


@pytest.mark.slow
def test_cache_off_writes_nothing(spark, small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDCT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["train", "--data", str(small_dataset), "--backbone", "VGG16", "--weights", "none", "--out", str(out),
            "--stack-folds", "0"]  # fmt: skip
    assert main([*args, "--cache", "off"]) == 0
    assert (out / "metrics.json").is_file()
    assert not (tmp_path / "cache").exists()


def test_cache_info_and_clear(spark, images, tmp_path, capsys):
    root = tmp_path / "cache"
    run(spark, images.limit(2), FeatureCache(root))
    assert main(["cache", "info", "--cache-dir", str(root)]) == 0
    assert "VGG16" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert not root.exists()
