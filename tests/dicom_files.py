"""Synthetic DICOM CT files written with pydicom (tests of ``covidct.data.dicom``), with planted patient data.

Every identifying tag holds a value from ``PHI`` (unique strings no output may contain), and the
UIDs come from ``uid()``: their text must not appear in any output either (outputs carry keyed hashes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

#: Planted in every file: none of these may appear in any output or log.
PHI = {
    "PatientName": "Plantedname^Zqxv",
    "PatientID": "PIDZQXV4411",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACCZQXV9921",
    "InstitutionName": "Zqxv Memorial Hospital",
    "InstitutionAddress": "1 Zqxv Street, Nowhere",
    "ReferringPhysicianName": "Referrer^Zqxvdoc",
    "PerformingPhysicianName": "Performer^Zqxvdoc",
    "OperatorsName": "Operator^Zqxvtech",
    "StationName": "ZQXVSTATION",
    "StudyID": "SIDZQXV77",
    "OtherPatientIDs": "OPIDZQXV12",
}
PREFIX = "1.2.826.0.1.3680043.10.1137."  # a test UID root; every generated UID starts with it


def uid() -> str:
    return generate_uid(prefix=PREFIX)


def write_ct(
    path: Path,
    stored: np.ndarray,
    *,
    series: str,
    study: str,
    sop: str | None = None,
    instance: int = 1,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    photometric: str = "MONOCHROME2",
    modality: str = "CT",
    thickness: float = 1.25,
    kernel: str = "B30f",
    extra: dict | None = None,
) -> Path:
    """A CT (or ``modality``) file: ``stored`` int16 values (rows, columns) or (frames, rows, columns)."""
    stored = np.asarray(stored, dtype=np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop or uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
    ds.Modality = modality
    ds.InstanceNumber = instance
    ds.SliceThickness = thickness
    ds.ConvolutionKernel = kernel
    for tag, value in PHI.items():
        setattr(ds, tag, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for tag, value in (extra or {}).items():
        setattr(ds, tag, value)
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def chest(size: int = 96, seed: int = 0) -> np.ndarray:
    """Stored values of a chest-like slice (intercept -1024): air outside, soft tissue, two dark lungs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    hu = np.full((size, size), -1000.0)
    hu[((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1] = 40.0
    for cx in (0.32, 0.68):
        hu[((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.25) ** 2 < 1] = -850.0
    hu += rng.normal(0, 20, hu.shape)
    return np.rint(hu + 1024).astype(np.int16)


def series_folder(root: Path, n_slices: int = 3, *, seed: int = 0, **kwargs) -> list[Path]:
    """One series of ``n_slices`` CT slices under ``root`` (one study, one series)."""
    series, study = kwargs.pop("series", uid()), kwargs.pop("study", uid())
    return [
        write_ct(root / f"IM{i:04d}.dcm", chest(seed=seed + i), series=series, study=study, instance=i + 1, **kwargs)
        for i in range(n_slices)
    ]
