"""The dataset: fetching, the manifest, decoding images, splits and the validation gate."""
