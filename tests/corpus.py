"""Real images from the PyPI package pydicom-data (and pydicom's own test files), never fetched at run time."""

from __future__ import annotations

from pathlib import Path

from pydicom.data import get_testdata_file

# name -> what it is; the images the issues name as the test corpus.
CORPUS = {
    "RG1_UNCI.dcm": "chest CR, MONOCHROME1, 1841x1955",
    "RG3_UNCI.dcm": "extremity CR, MONOCHROME1, 1760x1760",
    "693_UNCI.dcm": "CT, signed, 512x512",
    "MR2_UNCI.dcm": "MR, 1024x1024",
    "US1_UNCR.dcm": "US, RGB, 640x480",
    "emri_small.dcm": "enhanced MR, 10 frames, 64x64",
}

COMPRESSED = {
    "RG1_J2KR.dcm": "JPEG 2000 lossless",
    "RG1_J2KI.dcm": "JPEG 2000",
    "emri_small_RLE.dcm": "RLE lossless",
    "emri_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "JPEG lossless SV1",
    "color3d_jpeg_baseline.dcm": "JPEG baseline, multi-frame YBR",
}


def corpus_file(name: str) -> Path:
    """Path of a corpus image; fails with a clear message (never downloads) when pydicom-data is missing."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(
            f"test image {name!r} not found: install the test extras (pip install -e '.[test]'), "
            "which bring the PyPI package pydicom-data"
        )
    return Path(path)
