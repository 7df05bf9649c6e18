"""Decoding by content: JPEG data in .png files, RGBA/RGB/L modes, undecodable files."""

import io

import numpy as np
import pytest
from PIL import Image

from covidct.core.errors import ImageDecodeError
from covidct.data.image import decode, from_image_struct, open_image


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def rgb() -> Image.Image:
    yy, xx = np.mgrid[0:40, 0:50]  # smooth, so lossy JPEG stays close to the pixels
    arr = np.stack([xx * 5, yy * 6, (xx + yy) * 2], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def test_rgba_png_decodes_to_the_same_pixels_as_rgb(rgb):
    rgba = rgb.copy()
    rgba.putalpha(255)
    assert open_image(_bytes(rgba, "PNG")).mode == "RGBA"
    np.testing.assert_array_equal(decode(_bytes(rgba, "PNG"), 32), decode(_bytes(rgb, "PNG"), 32))


def test_grayscale_is_replicated_to_three_channels(rgb):
    gray = rgb.convert("L")
    out = decode(_bytes(gray, "PNG"), 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 1], out[..., 2])


def test_jpeg_data_in_a_png_named_file_is_decoded_by_content(rgb, tmp_path):
    path = tmp_path / "looks-like.png"
    path.write_bytes(_bytes(rgb, "JPEG"))
    assert open_image(path.read_bytes(), str(path)).format == "JPEG"
    out = decode(path.read_bytes(), 299, str(path))
    assert out.shape == (299, 299, 3)
    # JPEG is lossy: close to the original pixels, not equal
    assert np.abs(out - decode(_bytes(rgb, "PNG"), 299)).mean() < 3


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a recognised image format"),
    ],
)
def test_undecodable_bytes_name_the_file(data, reason):
    with pytest.raises(ImageDecodeError, match=rf"CT_COVID/bad\.png.*{reason}"):
        decode(data, 224, "CT_COVID/bad.png")


def test_truncated_image_fails_on_full_decode_not_silently(rgb):
    data = _bytes(rgb.resize((400, 400)), "PNG")
    with pytest.raises(ImageDecodeError, match="CT_NonCOVID/cut.png"):
        decode(data[: len(data) // 2], 224, "CT_NonCOVID/cut.png")


def test_spark_image_struct_is_bgr_and_converted_to_rgb(rgb):
    arr = np.asarray(rgb)
    row = {"origin": "x", "height": 40, "width": 50, "nChannels": 3, "mode": 16, "data": arr[:, :, ::-1].tobytes()}
    np.testing.assert_array_equal(from_image_struct(row, 32), decode(_bytes(rgb, "PNG"), 32))
    with pytest.raises(ImageDecodeError, match="bad-origin"):
        from_image_struct({**row, "origin": "bad-origin", "height": -1, "data": b""}, 32)
