"""The body mask and the views the backbone may see instead of the whole picture (``covidct.data.body``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from covidct.data.body import BODY, BODY_BLANK, FULL, apply_view, body_mask, grid_share, otsu
from covidct.data.image import PREPROCESSING_VERSION, decode, preprocessing_id
from synthetic import MARK, MARK_AT, body_picture, border_mark_dataset


def chest(h=300, w=360, margin=0, letter=False, cut=0, lung_window=False):
    """A CT-shaped picture: an oval body (tissue) holding two dark lungs on black air; optionally a white page
    margin around it, a white letter in the corner, or the body cut by the figure's crop (``cut`` pixels)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2, w / 2
    body = ((yy - cy) / (0.38 * h)) ** 2 + ((xx - cx) / (0.42 * w)) ** 2 <= 1
    tissue, lung = (235, 45) if lung_window else (140, 20)
    picture = np.full((h, w), 4.0)
    picture[body] = tissue
    for side in (-1, 1):
        lungs = ((yy - cy) / (0.26 * h)) ** 2 + ((xx - cx - side * 0.2 * w) / (0.14 * w)) ** 2 <= 1
        picture[lungs] = lung
    img = Image.fromarray(picture.astype(np.uint8)).convert("RGB")
    if letter:
        ImageDraw.Draw(img).rectangle([6, 6, 22, 30], fill=(255, 255, 255))
    truth = body.copy()
    if cut:
        img, truth = img.crop((cut, cut, w - cut, h - cut)), truth[cut : h - cut, cut : w - cut]
    if margin:
        framed = Image.new("RGB", (img.width + 2 * margin, img.height + 2 * margin), (255, 255, 255))
        framed.paste(img, (margin, margin))
        truth = np.pad(truth, margin)
        img = framed
    return np.asarray(img), truth


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"margin": 20}, {"letter": True}, {"lung_window": True}, {"cut": 40, "lung_window": True}],
    ids=["plain", "white-page-margin", "letter-in-corner", "lung-window", "body-cut-by-the-crop"],
)
def test_the_mask_is_the_body_lungs_included(kwargs):
    picture, truth = chest(**kwargs)
    body = body_mask(picture)
    assert body.found and body.mask.shape == truth.shape
    assert iou(body.mask, truth) > 0.93  # the lungs are dark, yet inside
    left, top, right, bottom = body.box
    rows, cols = np.nonzero(truth.any(axis=1))[0], np.nonzero(truth.any(axis=0))[0]
    assert abs(top - rows[0]) <= 12 and abs(bottom - rows[-1]) <= 12 and abs(left - cols[0]) <= 12


def test_a_large_picture_is_masked_at_its_own_size():
    picture, truth = chest(h=900, w=1100)
    body = body_mask(picture)
    assert body.mask.shape == (900, 1100) and iou(body.mask, truth) > 0.93


def test_nothing_plausible_gives_the_whole_picture():
    for blank in (np.zeros((64, 80, 3), np.uint8), np.full((64, 80, 3), 255, np.uint8)):
        body = body_mask(blank)
        assert not body.found and body.mask.all() and body.box == (0, 0, 80, 64)
        img = Image.fromarray(blank)
        assert apply_view(img, BODY_BLANK) is img  # left as it is


def test_otsu_splits_two_levels():
    grey = np.concatenate([np.full(500, 30), np.full(500, 200)])
    assert 30 < otsu(grey) < 200


def test_views_crop_and_blank_and_the_mark_is_gone():
    marked, plain = body_picture(3, 0, mark=True), body_picture(3, 0, mark=False)
    assert np.asarray(marked)[MARK_AT + MARK // 2, MARK_AT + MARK // 2] == 255
    for view in (BODY, BODY_BLANK):
        a, b = apply_view(marked.convert("RGB"), view), apply_view(plain.convert("RGB"), view)
        assert a.size == b.size and a.width < marked.width and a.height < marked.height
    blank = np.asarray(apply_view(marked.convert("RGB"), BODY_BLANK))
    assert np.array_equal(blank, np.asarray(apply_view(plain.convert("RGB"), BODY_BLANK)))
    assert blank[:3, :3].max() == 0  # outside the body: black
    assert apply_view(marked.convert("RGB"), FULL).size == marked.size
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(marked.convert("RGB"), "lungs")


def test_decode_applies_the_view_before_resizing(tmp_path):
    root = border_mark_dataset(tmp_path / "marks", per_class=2)
    marked = (root / "CT_COVID" / "mark-000%0.png").read_bytes()
    plain = (root / "CT_NonCOVID" / "plain-000%0.png").read_bytes()
    full = [decode(data, 224, "x", FULL) for data in (marked, plain)]
    blanked = [decode(data, 224, "x", BODY_BLANK) for data in (marked, plain)]
    assert full[0].shape == blanked[0].shape == (224, 224, 3)
    assert not np.array_equal(full[0], full[1])  # the whole picture shows the mark
    assert np.array_equal(blanked[0], blanked[1])  # body-blank does not


def test_preprocessing_id_names_what_the_backbone_sees():
    assert preprocessing_id() == PREPROCESSING_VERSION  # the whole picture: existing caches stay valid
    ids = {preprocessing_id(v, f) for v in (FULL, BODY, BODY_BLANK) for f in (False, True)}
    assert len(ids) == 6 and all("+" not in i and "/" not in i for i in ids)
    with pytest.raises(ValueError):
        preprocessing_id("lungs")


def test_grid_share_is_each_cells_share_inside():
    mask = np.zeros((70, 70), bool)
    mask[:, :35] = True
    share = grid_share(mask, (7, 7))
    assert share.shape == (7, 7)
    assert np.allclose(share[:, :3], 1) and np.allclose(share[:, 4:], 0) and np.allclose(share[:, 3], 0.5)


def test_real_pictures_get_a_body(real_data_dir):
    """On a sample of the real figures: a body is found, covering most but not all of the picture."""
    if real_data_dir is None:
        pytest.skip("no real data (COVIDCT_DATA_DIR)")
    files = (
        sorted((real_data_dir / "CT_COVID").iterdir())[::40] + sorted((real_data_dir / "CT_NonCOVID").iterdir())[::40]
    )
    shares = []
    for path in files:
        img = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        body = body_mask(np.asarray(img))
        assert body.found, path.name
        shares.append(body.share)
    assert 0.5 < float(np.median(shares)) < 0.98
