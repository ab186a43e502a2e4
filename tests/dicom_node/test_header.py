"""The C-STORE handler's header reader against pydicom, on real test images and on crafted encodings."""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode

from dicom_node.intake.header import _WANTED, HeaderError, _walk, read_header
from tests.corpus import corpus_file

KEYWORDS = [kw for kw, _ in _WANTED.values() if kw != "SpecificCharacterSet"]
INTEGERS = {"Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames"}


def test_images() -> list[Path]:
    """Every DICOM file of pydicom's own test files and of pydicom-data (the corpus), found on disk only."""
    folders = {Path(pydicom.data.__file__).parent / "test_files", corpus_file("RG1_UNCI.dcm").parent}
    return sorted(p for folder in folders for p in folder.rglob("*.dcm"))


test_images.__test__ = False  # type: ignore[attr-defined]


def split(path: Path) -> tuple[str, bytes, Dataset]:
    """(transfer syntax, the data set's bytes as a peer sends them, pydicom's reading of the file)."""
    raw = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        fp = BytesIO(raw)
        pydicom.filereader.read_preamble(fp, False)
        pydicom.filereader._read_file_meta_info(fp)
    return str(ds.file_meta.TransferSyntaxUID), raw[fp.tell() :], ds


def comparable(values: Any) -> dict[str, Any]:
    """The wanted attributes of a Dataset or a Header's values, as plain strings and integers (empty ones left out)."""
    out: dict[str, Any] = {}
    for kw in KEYWORDS:
        value = values.get(kw)
        if value is None or value == "":
            continue
        text = str(value).strip()
        out[kw] = int(text) if kw in INTEGERS and text.isdigit() else text
    return out


def test_the_walk_reads_what_pydicom_reads_on_every_test_image() -> None:
    images = test_images()
    assert len(images) > 100, "pydicom's and pydicom-data's test files are installed"
    walked, disagreements, unwalkable = 0, [], []
    for path in images:
        try:
            syntax, body, ds = split(path)
        except Exception:  # not a DICOM file pydicom reads (some test files are deliberately broken)
            continue
        if not pydicom.uid.UID(syntax).is_little_endian or pydicom.uid.UID(syntax).is_deflated:
            continue
        try:
            header = _walk(memoryview(body), implicit=pydicom.uid.UID(syntax).is_implicit_VR)
        except HeaderError as exc:
            unwalkable.append(f"{path.name}: {exc}")
            continue
        walked += 1
        if not len(ds):  # pydicom read nothing (a data set it cannot parse): nothing to compare
            continue
        if comparable(header.values) != comparable(ds):
            disagreements.append((path.name, comparable(header.values), comparable(ds)))
        if not pydicom.uid.UID(syntax).is_compressed and "PixelData" in ds:
            if header.pixel_length != len(ds.PixelData):
                disagreements.append((path.name, "pixel length", header.pixel_length, len(ds.PixelData)))
    assert walked > 100
    assert disagreements == []
    # The only ones the walk refuses: a data set in implicit VR under an explicit transfer syntax, and truncated
    # data sets. read_header reads those with pydicom, as the node always did.
    assert len(unwalkable) <= 3, unwalkable
    for line in unwalkable:
        name = line.split(":")[0]
        path = next(p for p in images if p.name == name)
        syntax, body, ds = split(path)
        assert comparable(read_header(body, syntax).values) == comparable(ds), name


def encoded(ds: Dataset, syntax: str) -> bytes:
    """``ds`` encoded as a peer sends it in ``syntax`` (no file meta)."""
    uid = pydicom.uid.UID(syntax)
    data = encode(ds, uid.is_implicit_VR, uid.is_little_endian)
    assert data is not None
    return data


def sample(**extra: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.StudyDescription = "CHEST"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 4, 4, 16, 1
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = b"\x01\x00" * 16
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_nested_sequences_of_undefined_length_are_skipped(syntax: str) -> None:
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "T-D3000", "Chest"
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds = sample(SourceImageSequence=Sequence([item, item]), BodyPartExamined="CHEST")
    for element in (ds["SourceImageSequence"], item["PurposeOfReferenceCodeSequence"]):
        element.is_undefined_length = True
    for each in (item, inner):
        each.is_undefined_length_sequence_item = True
    body = encoded(ds, syntax)
    assert b"\xfe\xff\xdd\xe0" in body, "pydicom wrote the sequences with undefined length"
    header = read_header(body, syntax)
    assert header.get("StudyInstanceUID") == ds.StudyInstanceUID
    assert header.get("BodyPartExamined") == "CHEST"
    assert header.pixel_length == 32 and header.native_pixel_bytes() == 32


def test_an_un_value_of_undefined_length_holds_implicit_vr_items() -> None:
    item = Dataset()
    item.CodeValue = "X"
    ds = sample()
    private = encoded(Dataset({}), ImplicitVRLittleEndian)
    body = encoded(ds, ExplicitVRLittleEndian)
    # (0009,0010) UN of undefined length, one item of undefined length in implicit VR, then the delimiters; placed
    # before the wanted (0020,000D) so the walk must get past it.
    item_body = encoded(item, ImplicitVRLittleEndian) + private
    un = (
        b"\x09\x00\x10\x00UN\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        + item_body
        + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    at = body.index(b"\x20\x00\x0d\x00UI")
    header = read_header(body[:at] + un + body[at:], ExplicitVRLittleEndian)
    assert header.get("StudyInstanceUID") == ds.StudyInstanceUID


def test_descriptions_are_decoded_with_the_character_set() -> None:
    ds = sample(SpecificCharacterSet="GB18030", StudyDescription="胸部 CT 平扫", SeriesDescription="肺窗")
    header = read_header(encoded(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert header.get("StudyDescription") == "胸部 CT 平扫"
    assert header.get("SeriesDescription") == "肺窗"


def test_truncated_pixel_data_reports_the_bytes_that_arrived() -> None:
    body = encoded(sample(), ExplicitVRLittleEndian)
    header = read_header(body[:-10], ExplicitVRLittleEndian)
    assert header.pixel_length == 22 and header.native_pixel_bytes() == 32


def test_lengths_past_the_end_are_refused_by_the_walk() -> None:
    body = encoded(sample(), ExplicitVRLittleEndian)
    at = body.index(b"\x20\x00\x0d\x00UI")
    broken = body[:at] + b"\x20\x00\x0d\x00UI\xff\x7f" + b"1.2"
    with pytest.raises(HeaderError, match="runs past the end"):
        _walk(memoryview(broken), implicit=False)
    with pytest.raises(HeaderError):
        _walk(memoryview(b"\x08\x00\x05"), implicit=True)
    # read_header hands it to pydicom, which reads what it can; the handler then refuses the missing UIDs.
    assert read_header(broken, ExplicitVRLittleEndian).get("SeriesInstanceUID") is None


def test_big_endian_is_read_by_pydicom() -> None:
    ds = sample(NumberOfFrames="1")
    header = read_header(encoded(ds, ExplicitVRBigEndian), ExplicitVRBigEndian)
    assert header.get("SOPInstanceUID") == ds.SOPInstanceUID
    assert header.pixel_length == 32 and header.native_pixel_bytes() == 32


def test_implicit_vr_data_under_an_explicit_syntax_is_read_by_pydicom() -> None:
    """Some peers send implicit VR data on an explicit VR context: the walk notices and pydicom reads it."""
    ds = sample(BodyPartExamined="CHEST")
    body = encoded(ds, ImplicitVRLittleEndian)
    with pytest.raises(HeaderError, match="no explicit VR"):
        _walk(memoryview(body), implicit=False)
    header = read_header(body, ExplicitVRLittleEndian)
    assert header.get("SOPInstanceUID") == ds.SOPInstanceUID
    assert header.get("StudyInstanceUID") == ds.StudyInstanceUID
    assert header.get("BodyPartExamined") == "CHEST"
