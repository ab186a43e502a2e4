"""DICOM pixels to display-ready images on the real corpus: statistics, orientation, codecs, colour, selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from inference.errors import PoisonInputError
from inference.pixels import (
    CT_WINDOWS,
    InstanceHeader,
    apply_window,
    evenly_spaced,
    load_image,
    read_header,
    select_images,
)
from tests.corpus import COMPRESSED, CORPUS, corpus_file


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom test data")
    return Path(path)


def grey(name: str, **kwargs: object) -> np.ndarray:
    pixels = load_image(pydicom_file(name), **kwargs).pixels  # type: ignore[arg-type]
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    return pixels[..., 0].astype(int)


@pytest.mark.parametrize("name", sorted(CORPUS) + sorted(COMPRESSED))
def test_every_corpus_image_renders_at_source_size_with_contrast(name: str) -> None:
    path = corpus_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    image = load_image(path)
    assert image.pixels.shape == (ds.Rows, ds.Columns, 3)
    assert image.pixels.dtype == np.uint8
    assert image.ref.sop_instance_uid == ds.SOPInstanceUID and image.ref.frame_number == 1
    assert image.pixels.std() > 15, "a flat image means the window or the decoder went wrong"
    assert image.pixels.max() > 200 and image.pixels.min() < 40  # uses the display range


def test_monochrome1_chest_radiograph_is_inverted_lungs_dark() -> None:
    pixels = grey("RG1_UNCI.dcm")
    rows, columns = pixels.shape
    band = slice(int(rows * 0.35), int(rows * 0.55))
    right_lung = pixels[band, int(columns * 0.20) : int(columns * 0.35)].mean()
    left_lung = pixels[band, int(columns * 0.65) : int(columns * 0.80)].mean()
    mediastinum = pixels[band, int(columns * 0.45) : int(columns * 0.55)].mean()
    assert right_lung < mediastinum - 40 and left_lung < mediastinum - 40


def test_monochrome1_inversion_is_exact() -> None:
    ds = pydicom.dcmread(pydicom_file("RG1_UNCI.dcm"))
    normal = load_image(ds, window="full_range").pixels[..., 0].astype(int)
    ds.PhotometricInterpretation = "MONOCHROME2"
    flipped = load_image(ds, window="full_range").pixels[..., 0].astype(int)
    assert np.abs(normal + flipped - 255).max() <= 1


def test_signed_ct_windows_are_selectable_and_ordered() -> None:
    # Head CT (signed, rescale intercept -1024): brain ~ 40 HU, air outside.
    centre = slice(200, 312)
    means = {w: grey("693_UNCR.dcm", window=w)[centre, centre].mean() for w in ("lung", "soft_tissue", "bone")}
    assert means["lung"] > 200 > means["soft_tissue"] > means["bone"]
    assert 90 < means["soft_tissue"] < 150  # 40 HU sits in the middle of the soft-tissue window (40/400)
    for window in ("lung", "soft_tissue", "bone", "auto"):
        assert grey("693_UNCR.dcm", window=window)[:20, :20].max() == 0  # air is black in every window


def test_ct_without_header_window_gets_soft_tissue() -> None:
    image = load_image(pydicom_file("CT_small.dcm"))
    assert image.window == "soft_tissue"
    assert image.pixels[:5, :5].mean() < 5  # air


def test_header_window_is_the_default_and_linear_per_dicom() -> None:
    ds = pydicom.dcmread(pydicom_file("693_UNCR.dcm"))
    assert load_image(ds).window == "header"
    values = np.array([-1000.0, 39.5 - 49.5, 40.0, 39.5 + 49.5, 1000.0])
    out = apply_window(values, 40.0, 100.0)
    assert out[0] == 0.0 and out[-1] == 1.0 and out[2] == pytest.approx(0.5 + 0.5 / 99)
    assert out[1] == pytest.approx(0.0) and out[3] == pytest.approx(1.0)
    assert CT_WINDOWS["lung"] == (-600.0, 1500.0)


def test_voi_lut_sequence_and_modality_lut_sequence() -> None:
    assert load_image(pydicom_file("vlut_04.dcm")).window == "header"
    mlut = load_image(pydicom_file("mlut_18.dcm"))
    assert mlut.pixels.std() > 30


@pytest.mark.parametrize(
    ("reference", "other", "max_diff"),
    [
        ("RG1_UNCR.dcm", "RG1_J2KR.dcm", 0),
        ("RG1_UNCI.dcm", "RG1_J2KI.dcm", 1),
        ("MR2_UNCR.dcm", "MR2_J2KR.dcm", 0),
        ("693_UNCR.dcm", "693_J2KR.dcm", 0),
        ("US1_UNCR.dcm", "US1_J2KR.dcm", 0),  # RGB vs JPEG 2000 YBR_RCT
        ("emri_small.dcm", "emri_small_RLE.dcm", 0),
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", 0),
        ("emri_small.dcm", "emri_small_big_endian.dcm", 0),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 0),
        ("SC_rgb.dcm", "SC_rgb_rle.dcm", 0),
        ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG lossless RGB
        ("SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", 8),
        ("SC_rgb.dcm", "SC_ybr_full_422_uncompressed.dcm", 8),
        ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", 8),  # JPEG baseline YBR_FULL
        ("SC_rgb.dcm", "SC_rgb_16bit.dcm", 0),  # 16 bits per sample scaled by Bits Stored
        ("SC_rgb_16bit.dcm", "SC_rgb_expb_16bit.dcm", 0),
        ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", 0),  # palette colour
    ],
)
def test_compressed_and_uncompressed_versions_decode_alike(reference: str, other: str, max_diff: int) -> None:
    a = load_image(pydicom_file(reference)).pixels.astype(int)
    b = load_image(pydicom_file(other)).pixels.astype(int)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= max_diff
    assert np.abs(a - b).mean() < 1.0


def test_rgb_and_ybr_stay_colour_and_in_rgb_order() -> None:
    rgb = load_image(pydicom_file("SC_rgb.dcm")).pixels
    # SC_rgb holds bands of pure red, green and blue: a red band has R high, G and B low.
    reds = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    blues = (rgb[..., 2] > 200) & (rgb[..., 0] < 60) & (rgb[..., 1] < 60)
    assert reds.mean() > 0.05 and blues.mean() > 0.05
    ybr = load_image(pydicom_file("SC_ybr_full_422_uncompressed.dcm")).pixels
    assert ((ybr[..., 0] > 200) & (ybr[..., 1] < 60) & (ybr[..., 2] < 60)).mean() > 0.05


def test_ultrasound_cine_ybr_422_jpeg_frame_is_grey_not_tinted() -> None:
    # An echo cine compressed as YBR_FULL_422 JPEG: after conversion to RGB its grey anatomy has R == G == B
    # (a missing conversion leaves Cb/Cr near 128 in the G/B channels: a strong tint).
    image = load_image(pydicom_file("color3d_jpeg_baseline.dcm"), frame_number=60)
    assert image.ref.frame_number == 60
    pixels = image.pixels.astype(int)
    assert np.abs(pixels[..., 0] - pixels[..., 1]).mean() < 3


def test_palette_colour_goes_through_its_lut() -> None:
    ds = pydicom.dcmread(pydicom_file("OBXXXX1A.dcm"))
    image = load_image(ds)
    assert image.window == "palette"
    expected = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)  # 16-bit LUT entries here
    assert expected.dtype == np.uint16
    assert np.abs(image.pixels.astype(float) - expected / 65535 * 255).max() <= 0.5 + 1e-9


def test_multi_frame_keeps_frame_numbers_and_frames_differ() -> None:
    path = corpus_file("emri_small.dcm")
    first, last = load_image(path, frame_number=1), load_image(path, frame_number=10)
    assert (first.ref.frame_number, last.ref.frame_number) == (1, 10)
    assert first.ref.sop_instance_uid == last.ref.sop_instance_uid
    assert np.abs(first.pixels.astype(int) - last.pixels.astype(int)).mean() > 5
    with pytest.raises(PoisonInputError, match="beyond NumberOfFrames 10"):
        load_image(path, frame_number=11)


def test_undecodable_pixels_are_poison_with_a_reason() -> None:
    with pytest.raises(PoisonInputError, match=r"1\.2\.840\.10008\.1\.2\.4\.51\) cannot be decoded"):
        load_image(pydicom_file("JPEG-lossy.dcm"))  # a corrupt JPEG Extended file
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.PixelData
    with pytest.raises(PoisonInputError, match="no integer PixelData"):
        load_image(ds)


# --------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------
def header(
    uid: str,
    series: str,
    modality: str,
    position: float | None = None,
    frames: int = 1,
    number: int | None = None,
    pixels: bool = True,
) -> InstanceHeader:
    return InstanceHeader(Path(f"/x/{uid}"), uid, "", series, "1.2.3", modality, pixels, frames, number, position)


def test_evenly_spaced_takes_centres() -> None:
    assert evenly_spaced(10, 3) == [1, 5, 8]
    assert evenly_spaced(20, 1) == [10]
    assert evenly_spaced(2, 3) == [0, 1]


def test_ct_series_gives_n_slices_ordered_by_position() -> None:
    rng = np.random.default_rng(0)
    positions = rng.permutation(30)
    headers = [header(f"1.{p}", "s1", "CT", position=float(p) * 2.5, number=int(30 - p)) for p in positions]
    chosen = select_images(headers, slices_per_series=3)
    assert [c.ref.sop_instance_uid for c in chosen] == ["1.5", "1.15", "1.25"]


def test_multi_frame_series_selects_frames_and_projections_are_all_kept() -> None:
    headers = [
        header("9.1", "mr", "MR", frames=10),
        header("8.1", "cr", "CR"),
        header("8.2", "cr", "CR"),
        header("7.1", "sr", "SR", pixels=False),
        header("6.1", "seg", "SEG"),
    ]
    chosen = select_images(headers, slices_per_series=3, max_images=8)
    refs = {(c.ref.sop_instance_uid, c.ref.frame_number) for c in chosen}
    assert refs == {("8.1", 1), ("8.2", 1), ("9.1", 2), ("9.1", 6), ("9.1", 9)}
    capped = select_images(headers, slices_per_series=3, max_images=3)
    assert len(capped) == 3 and {c.header.series_instance_uid for c in capped} == {"cr", "mr"}  # round-robin


def test_real_headers_are_classified() -> None:
    mr = read_header(corpus_file("emri_small.dcm"))
    cr = read_header(corpus_file("RG1_UNCI.dcm"))
    assert mr is not None and cr is not None
    assert mr.frames == 10 and mr.is_image and cr.is_image and cr.modality == "CR"
    ct = read_header(corpus_file("693_UNCI.dcm"))
    assert ct is not None and ct.position is not None
    assert read_header(Path(__file__)) is None  # not DICOM: skipped, not raised
