"""DICOM CT slices: from a PACS export's files to the 8-bit pictures the backbones take, without patient data.

A DICOM Part 10 file (the ``DICM`` marker at byte 128; found by content, never by name) is read
with pydicom; compressed pixel data (JPEG baseline/lossless, JPEG-LS, JPEG 2000) is decoded by
GDCM, RLE and Deflate by pydicom itself. Then, as a DICOM viewer displays a slice:

1. Modality must be CT (others are listed, naming their modality, and skipped); one sample per
   pixel (a colour "CT" is a screenshot, not Hounsfield units).
2. The modality LUT: ``RescaleSlope`` / ``RescaleIntercept`` (per frame in enhanced multi-frame
   files) turn stored values into Hounsfield units (HU).
3. The window (default: lung, level −600 HU, width 1500 HU; ``Window.parse("-600,1500")``) maps
   HU linearly to 0..255 by DICOM's own VOI function: about ``level - width/2`` and below black,
   ``level + width/2`` and above white.
4. MONOCHROME1 (lowest value shown white) is inverted after windowing, as its presentation LUT says.
5. A multi-frame file gives one slice per frame (numbered from 1).

Each slice is then an 8-bit grayscale PNG (lossless), which the featurizer decodes like any image:
the backbone's usual preprocessing follows. What the window did is part of those bytes, so features
or scores made with another window never mix (the ledger's key includes the window too).

No patient data leaves this module: a slice carries keyed hashes of its SOP instance, series and study
UIDs (HMAC-SHA256 with the deployment's salt, ``covidct.core.secrets``) and only the technical tags a
score needs (modality, slice thickness, convolution kernel, instance number). Files whose pixels may
show patient data (``BurnedInAnnotation`` YES) and DICOMDIR indexes are not scored; reasons never quote
a header value. pydicom's warnings (which can quote one) are silenced while reading.

The models learned from figure crops of papers, not raw PACS slices: research use, not for diagnosis
(``NOTICE``).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from covidct.core.errors import CovidctError, ImageDecodeError

#: Bumped whenever the way a slice becomes a picture changes (with the window, part of every slice's key).
DICOM_PREPROCESSING = "dicom-hu-window-v1"
#: Said by every output that holds DICOM results.
NOTICE = (
    "Research use only, not for diagnosis: the models learned from CT figures cropped from papers, not from "
    "raw PACS slices; scores of DICOM slices are outside the data they were validated on."
)
#: The DICOMDIR's SOP class (Media Storage Directory Storage): an index of the export, no pixels.
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_MARKER = b"DICM"
_WINDOW = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Window:
    """A display window in Hounsfield units: ``level`` (its centre) and ``width``."""

    level: float = -600.0
    width: float = 1500.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.level) and math.isfinite(self.width)) or self.width < 1:
            raise CovidctError(f"a window needs a finite level and a width of at least 1 HU, not {self}")
        if not -2000 <= self.level <= 4000 or self.width > 10000:
            raise CovidctError(f"window level {self.level:g} / width {self.width:g} HU is outside what CT shows")

    @classmethod
    def parse(cls, text: str | None) -> Window:
        """``"LEVEL,WIDTH"`` in HU (``"-600,1500"``, the lung window); empty: the lung window."""
        if text is None or not str(text).strip():
            return cls()
        match = _WINDOW.match(str(text))
        if not match:
            raise CovidctError(f"window {text!r}: expected LEVEL,WIDTH in Hounsfield units, e.g. -600,1500")
        return cls(float(match.group(1)), float(match.group(2)))

    @property
    def id(self) -> str:
        """``L-600_W1500``: recorded with every DICOM result."""
        return f"L{self.level:g}_W{self.width:g}"

    def to_8bit(self, hu: np.ndarray) -> np.ndarray:
        """HU -> uint8 by DICOM's linear VOI function (PS3.3 C.11.2.1.2.1), as a viewer shows the slice:
        ``((x - (level - 0.5)) / (width - 1) + 0.5) * 255``, clipped to 0..255, rounded half up; a width of
        1 is a threshold at ``level - 0.5``."""
        x = np.asarray(hu, dtype=np.float64)
        if self.width == 1:
            return np.where(x <= self.level - 0.5, 0, 255).astype(np.uint8)
        y = ((x - (self.level - 0.5)) / (self.width - 1) + 0.5) * 255.0
        return np.floor(np.clip(y, 0, 255) + 0.5).astype(np.uint8)


LUNG = Window()


@dataclass(frozen=True)
class Slice:
    """One CT slice, ready to score: its picture and what outputs may say about it."""

    picture: np.ndarray  # uint8, (rows, columns): the windowed slice as displayed
    frame: int | None  # 1-based frame of a multi-frame file; None for a single-frame file
    key: str  # the ledger's key: HMAC(salt, SOP instance UID, frame, preprocessing, window)
    sop: str  # HMAC(salt, SOPInstanceUID)
    series: str  # HMAC(salt, SeriesInstanceUID)
    study: str  # HMAC(salt, StudyInstanceUID)
    modality: str
    instance_number: int | None
    slice_thickness: float | None
    kernel: str | None
    window: str  # Window.id

    def png(self) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.picture, mode="L").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def is_dicom(data: bytes | None) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    return data is not None and len(data) >= 132 and data[128:132] == _MARKER


def pseudonym(salt: bytes, value: str) -> str:
    """The keyed hash outputs carry instead of a UID (64 hex digits)."""
    return hmac.new(salt, value.encode("utf-8"), hashlib.sha256).hexdigest()


def read_slices(data: bytes, salt: bytes, window: Window = LUNG) -> list[Slice]:
    """Every slice of one DICOM file, windowed; ``ImageDecodeError`` (with a reason, never a header value)
    when it cannot or must not be scored."""
    try:
        return _read_slices(data, salt, window)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed element (e.g. text where a number belongs)
        raise _refused(f"its header cannot be read ({type(exc).__name__})") from None


def _read_slices(data: bytes, salt: bytes, window: Window) -> list[Slice]:
    import pydicom
    from pydicom import config as dicom_config

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    dicom_config.settings.reading_validation_mode = dicom_config.IGNORE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds; the reason names the kind only
            raise _refused(f"not a readable DICOM file ({type(exc).__name__})") from None
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
            raise _refused("a DICOMDIR (the export's index, no pixels: its slices are scored from their own files)")
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if not modality:
            raise _refused("no DICOM modality (not an image, or a truncated file): not scored")
        if modality != "CT":
            raise _refused(f"DICOM modality {modality}, not CT: not scored")
        if "PixelData" not in ds:
            raise _refused("a DICOM CT file without pixel data")
        if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
            raise _refused("BurnedInAnnotation YES: its pixels may show patient data, not scored")
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise _refused(f"DICOM {photometric or 'colour'} pixels: a CT slice in Hounsfield units is monochrome")
        uids = {}
        for tag in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            value = str(ds.get(tag, "") or "").strip()
            if not value:
                raise _refused(f"no {tag}: slices cannot be told apart or grouped")
            uids[tag] = value
        try:
            stored = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - the pixel handlers' own errors: lengths, syntaxes, codecs
            syntax = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", "unknown transfer syntax")
            raise _refused(f"its pixel data ({syntax}) cannot be decoded: {_first_line(exc)}") from None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        stored = stored.reshape((frames, *stored.shape[-2:])) if frames > 1 else stored[np.newaxis]
        hu = hounsfield(ds, stored)
        meta = {
            "modality": modality,
            "instance_number": _number(ds, "InstanceNumber", int),
            "slice_thickness": _number(ds, "SliceThickness", float),
            "kernel": _kernel(ds),
        }
    sop, series, study = (pseudonym(salt, uids[t]) for t in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"))
    slices = []
    for i, frame_hu in enumerate(hu):
        picture = window.to_8bit(frame_hu)
        if photometric == "MONOCHROME1":
            picture = 255 - picture
        frame = i + 1 if frames > 1 else None
        key = pseudonym(salt, f"{uids['SOPInstanceUID']}|{frame or 1}|{DICOM_PREPROCESSING}|{window.id}")
        slices.append(Slice(picture, frame, key, sop, series, study, window=window.id, **meta))
    return slices


def hounsfield(ds, stored: np.ndarray) -> np.ndarray:
    """Stored values (frames, rows, columns) -> HU, by the modality LUT: the file's RescaleSlope and
    RescaleIntercept, else each frame's (enhanced multi-frame: the functional groups), else none (1, 0)."""
    stored = stored.astype(np.float64)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return stored * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    shared = _transformation(ds.get("SharedFunctionalGroupsSequence"), 0)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    out = np.empty_like(stored)
    for i in range(stored.shape[0]):
        slope, intercept = _transformation(per_frame, i) or shared or (1.0, 0.0)
        out[i] = stored[i] * slope + intercept
    return out


def _transformation(groups, index: int) -> tuple[float, float] | None:
    if not groups or index >= len(groups):
        return None
    item = groups[index].get("PixelValueTransformationSequence")
    if not item:
        return None
    return float(item[0].get("RescaleSlope", 1) or 1), float(item[0].get("RescaleIntercept", 0) or 0)


def _number(ds, tag: str, kind):
    try:
        value = ds.get(tag)
        return kind(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _kernel(ds) -> str | None:
    value = ds.get("ConvolutionKernel")
    if value in (None, ""):
        return None
    return str(value) if isinstance(value, str) else "/".join(str(v) for v in value)  # multi-valued: A/B


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _refused(reason: str) -> ImageDecodeError:
    return ImageDecodeError(reason)
