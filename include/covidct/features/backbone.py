"""The ImageNet CNN backbones: one table, and where each one's weights come from.

Nothing else in the package names a backbone. This module imports no TensorFlow:
the Keras constructor and ``preprocess_input`` are looked up by name only in the
place that builds a model (a Spark Python worker, or a benchmark).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from covidct.core.errors import CovidctError, WeightsNotFoundError

#: Environment variable naming a folder of Keras "notop" weight files under their
#: official names (what Keras caches in ~/.keras/models). Air-gapped sites use it.
WEIGHTS_DIR_ENV = "COVIDCT_WEIGHTS_DIR"
#: Keras' download location; COVIDCT_WEIGHTS_URL overrides it (an internal mirror laid out the same).
KERAS_WEIGHTS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
WEIGHTS_URL_ENV = "COVIDCT_WEIGHTS_URL"

#: Multi-layer poolings: global pools of each conv block output in ``Backbone.blocks`` (blocks
#: 3, 4 and 5), concatenated. Layout: every block's average first (block 3, 4, 5), then, for
#: ``avgmax``, every block's maximum in the same order; so ``avg-b345`` is the prefix of
#: ``avgmax-b345`` and its last part is exactly the plain ``avg`` features.
MULTI_LAYER_POOLINGS: dict[str, tuple[str, ...]] = {"avg-b345": ("avg",), "avgmax-b345": ("avg", "max")}
POOLINGS = ("avg", "flatten", *MULTI_LAYER_POOLINGS)
#: float32: faithful features. bfloat16: Keras' mixed_bfloat16 policy (float32 weights, bfloat16
#: compute): about 2x faster on CPUs with AVX512_BF16/AMX (AMD Zen 4, Intel Sapphire Rapids),
#: features within ~1 % of float32; slower on CPUs without native bfloat16.
PRECISIONS = ("float32", "bfloat16")
RANDOM_WEIGHTS = ("none", "random")


@dataclass(frozen=True)
class Backbone:
    """One Keras application used as a frozen feature extractor."""

    name: str  # canonical, as in sparkdl's modelName: "VGG16"
    module: str  # "keras.applications.vgg16": holds the constructor and preprocess_input
    constructor: str  # "VGG16"
    input_size: int  # square input side in pixels
    feature_map: tuple[int, int, int]  # last conv block's (height, width, channels) at input_size
    weights_file: str  # Keras' official notop file name
    weights_subdir: str  # its folder under Keras' download base
    weights_md5: str  # the hash Keras checks
    #: The outputs of conv blocks 3, 4 and 5 for the multi-layer poolings: (Keras layer name,
    #: channels). The last is the layer ``pooling="avg"`` pools. Empty: no multi-layer pooling.
    blocks: tuple[tuple[str, int], ...] = ()

    @property
    def weights_origin(self) -> str:
        """Where Keras downloads the notop weights from."""
        base = os.environ.get(WEIGHTS_URL_ENV) or KERAS_WEIGHTS_BASE
        return base.rstrip("/") + "/" + self.weights_subdir + "/" + self.weights_file

    def feature_dim(self, pooling: str) -> int:
        h, w, c = self.feature_map
        if pooling in MULTI_LAYER_POOLINGS:
            return len(MULTI_LAYER_POOLINGS[pooling]) * sum(channels for _, channels in self.block_layers(pooling))
        return c if pooling == "avg" else h * w * c

    def block_layers(self, pooling: str) -> tuple[tuple[str, int], ...]:
        """The (layer, channels) a multi-layer pooling reads; a CovidctError where none are defined."""
        if not self.blocks:
            supported = ", ".join(b.name for b in BACKBONES.values() if b.blocks)
            raise CovidctError(
                f"pooling {pooling!r} is defined for {supported}, not for {self.name}; "
                f"use pooling avg or flatten with {self.name}"
            )
        return self.blocks

    def check_pooling(self, pooling: str) -> str:
        """``pooling`` if this backbone supports it, else a CovidctError naming what it supports."""
        if pooling not in POOLINGS:
            raise CovidctError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        if pooling in MULTI_LAYER_POOLINGS:
            self.block_layers(pooling)
        return pooling

    def keras_constructor(self):
        return getattr(importlib.import_module(self.module), self.constructor)

    def preprocess_input(self):
        return importlib.import_module(self.module).preprocess_input


def _b(name, module, ctor, size, fmap, sub, fname, md5, blocks=()) -> Backbone:
    return Backbone(name, module, ctor, size, fmap, fname, sub, md5, tuple(blocks))


# Blocks 3, 4, 5: VGG's block pools (the last is what pooling="avg" pools); ResNet50's stage
# outputs conv3_x, conv4_x, conv5_x (He et al.'s names). Xception and InceptionV3 have no blocks
# numbered 3-5 (entry/middle/exit flows; mixed0-10), so they get no multi-layer pooling.
_VGG_BLOCKS = (("block3_pool", 256), ("block4_pool", 512), ("block5_pool", 512))
_RESNET50_BLOCKS = (("conv3_block4_out", 512), ("conv4_block6_out", 1024), ("conv5_block3_out", 2048))


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        _b("VGG16", "keras.applications.vgg16", "VGG16", 224, (7, 7, 512), "vgg16",
           "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc", _VGG_BLOCKS),
        _b("VGG19", "keras.applications.vgg19", "VGG19", 224, (7, 7, 512), "vgg19",
           "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "253f8cb515780f3b799900260a226db6", _VGG_BLOCKS),
        _b("Xception", "keras.applications.xception", "Xception", 299, (10, 10, 2048), "xception",
           "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", "b0042744bf5b25fce3cb969f33bebb97"),
        _b("ResNet50", "keras.applications.resnet50", "ResNet50", 224, (7, 7, 2048), "resnet",
           "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "4d473c1dd8becc155b73f8504c6f6626",
           _RESNET50_BLOCKS),
        _b("InceptionV3", "keras.applications.inception_v3", "InceptionV3", 299, (8, 8, 2048), "inception_v3",
           "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "bcbd6486424b2319ff4ef7d526e38f63"),
    )
}  # fmt: skip


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name, case-insensitively ("vgg16" or "VGG16")."""
    for key, backbone in BACKBONES.items():
        if key.lower() == str(name).lower():
            return backbone
    raise CovidctError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def normalize_weights(weights: str | None) -> str:
    """'imagenet', 'none' (random weights, asked for explicitly) or a path to a weights file."""
    if weights is None or str(weights).strip().lower() in RANDOM_WEIGHTS:
        return "none"
    if str(weights).strip().lower() == "imagenet":
        return "imagenet"
    return str(weights)


def is_random(weights: str | None) -> bool:
    return normalize_weights(weights) == "none"


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def local_weights_file(backbone: Backbone, weights: str | None) -> Path | None:
    """The file to load, without downloading: None for random weights.

    For 'imagenet': $COVIDCT_WEIGHTS_DIR/<official name>, then Keras' own cache.
    Raises WeightsNotFoundError where imagenet weights are in neither place
    (the caller may then try Keras' download, see ``download_weights``).
    """
    weights = normalize_weights(weights)
    if weights == "none":
        return None
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CovidctError(f"weights file {path} does not exist")
        return path
    for path in _local_candidates(backbone):
        if path.is_file():
            return path
    raise WeightsNotFoundError(_missing_message(backbone))


def _local_candidates(backbone: Backbone) -> list[Path]:
    """$COVIDCT_WEIGHTS_DIR/<official name>, then Keras' cache ~/.keras/models/<official name>."""
    candidates = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        candidates.append(Path(os.environ[WEIGHTS_DIR_ENV]).expanduser() / backbone.weights_file)
    candidates.append(keras_cache_dir() / backbone.weights_file)
    return candidates


def _missing_message(backbone: Backbone, download_error: str | None = None) -> str:
    where = " and ".join(str(p) for p in _local_candidates(backbone))
    if not os.environ.get(WEIGHTS_DIR_ENV):
        where += f" (${WEIGHTS_DIR_ENV} is not set)"
    msg = (
        f"ImageNet weights for {backbone.name} are not available. Looked for {where}. "
        f"Either put {backbone.weights_file} into a folder and set {WEIGHTS_DIR_ENV} to it "
        f"(without network: copy ~/.keras/models from a machine where Keras has downloaded them), "
        f"or let Keras download {backbone.weights_origin} into {keras_cache_dir()} "
        f"(${WEIGHTS_URL_ENV} names a mirror of {KERAS_WEIGHTS_BASE})"
    )
    if download_error:
        msg += f" (the download failed: {download_error})"
    return msg + ". Use --weights none only if you want random weights."


def download_weights(backbone: Backbone) -> Path:
    """Keras' normal download into its cache (checks Keras' md5); imports Keras."""
    from keras.utils import get_file

    try:
        return Path(
            get_file(
                backbone.weights_file, backbone.weights_origin, cache_subdir="models", file_hash=backbone.weights_md5
            )
        )
    except Exception as exc:  # noqa: BLE001 - any download failure is reported the same way
        raise WeightsNotFoundError(_missing_message(backbone, f"{type(exc).__name__}: {exc}")) from None


def resolve_weights(backbone: Backbone, weights: str | None, download: bool = True) -> Path | None:
    """The weights file to load: local first, then (if allowed) Keras' download; None = random."""
    try:
        return local_weights_file(backbone, weights)
    except WeightsNotFoundError:
        if not download:
            raise
        return download_weights(backbone)


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(backbone: Backbone, weights: str | None, seed: int = 0, download: bool = True) -> str:
    """A short string that changes whenever the weights' values can change.

    'random-seed0' for seeded random weights, else 'sha256-<16 hex>' of the file
    actually loaded. Used in metrics.json and as a feature-cache key.
    """
    path = resolve_weights(backbone, weights, download=download)
    if path is None:
        return f"random-seed{int(seed)}"
    stat = path.stat()
    return "sha256-" + _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)[:16]
