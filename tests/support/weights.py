"""Stand-in ImageNet weights: a backbone's real Keras "notop" .h5 layout, holding random values.

The job and the gate take such a file as ImageNet weights (a weights file, not ``weights: none``):
a run with it is promotable, and it costs no download.
"""

from __future__ import annotations

from pathlib import Path

FILES = {
    "VGG16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "VGG19": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "Xception": "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


def write_weights(folder: Path, backbones=("VGG16",)) -> Path:
    """``folder`` with one Keras-named notop weights file per backbone (COVIDCT_WEIGHTS_DIR's layout)."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    folder.mkdir(parents=True, exist_ok=True)
    for name in backbones:
        model = getattr(keras.applications, name)(include_top=False, weights=None)
        with h5py.File(folder / FILES[name], "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    return folder
