"""The backbone table and where ImageNet weights come from."""

import pytest

from covidct.core.errors import CovidctError, WeightsNotFoundError
from covidct.features.backbone import (
    BACKBONES,
    get_backbone,
    local_weights_file,
    normalize_weights,
    resolve_weights,
    weights_identity,
)


def test_table_has_the_study_backbones_and_sparkdls_others():
    assert list(BACKBONES) == ["VGG16", "VGG19", "Xception", "ResNet50", "InceptionV3"]
    assert get_backbone("vgg16").feature_dim("flatten") == 25088
    assert get_backbone("xception").feature_dim("flatten") == 204800
    assert get_backbone("VGG19").feature_dim("avg") == 512
    with pytest.raises(CovidctError, match="unknown backbone 'AlexNet'"):
        get_backbone("AlexNet")


@pytest.mark.parametrize(
    "value, expected", [(None, "none"), ("None", "none"), ("random", "none"), ("ImageNet", "imagenet")]
)
def test_weights_spellings(value, expected):
    assert normalize_weights(value) == expected


def test_weights_dir_is_looked_up_first_under_keras_official_names(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv("COVIDCT_WEIGHTS_DIR", str(tmp_path))
    backbone = get_backbone("VGG19")
    target = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with pytest.raises(WeightsNotFoundError):
        local_weights_file(backbone, "imagenet")
    target.write_bytes(b"weights")
    assert local_weights_file(backbone, "imagenet") == target
    assert weights_identity(backbone, "imagenet").startswith("sha256-")
    assert weights_identity(backbone, "none", seed=3) == "random-seed3"


def test_keras_cache_is_the_second_place(tmp_path, monkeypatch):
    monkeypatch.delenv("COVIDCT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.write_bytes(b"x")
    assert resolve_weights(get_backbone("Xception"), "imagenet", download=False) == cached


def test_missing_weights_fail_saying_both_ways_never_random(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv("COVIDCT_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("COVIDCT_WEIGHTS_URL", "http://127.0.0.1:9/")  # nothing listens: the download fails
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(get_backbone("VGG16"), "imagenet")
    message = str(info.value)
    assert "COVIDCT_WEIGHTS_DIR" in message and "download" in message
    assert "http://127.0.0.1:9/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    # Instructions any user can follow: nothing that exists only in the development checkout.
    assert "~/.keras/models" in message and "COVIDCT_WEIGHTS_URL" in message and "shared/tools" not in message


def test_a_weights_path_must_exist(tmp_path):
    with pytest.raises(CovidctError, match="does not exist"):
        resolve_weights(get_backbone("VGG16"), str(tmp_path / "nope.h5"))
