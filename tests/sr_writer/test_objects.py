"""What a user checks on GSPS, SEG, SC and UIDs: boxes on the right pixels, window kept, frames referenced."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from sr_writer import BoundingBox, Finding, ImageRef, ResultUIDs, build_result_objects, write_result_objects
from sr_writer.context import ResultOptions
from sr_writer.seg import box_mask
from tests.sr_writer.conftest import BuiltStudy
from tests.sr_writer.helpers import ALGORITHM, STUDIES, ellipse_mask, read, synthetic_result, synthetic_series


def _one(study: BuiltStudy, modality: str):
    (ds, _), *_ = study.of_modality(modality)
    return ds


def test_gsps_draws_each_box_as_a_closed_polyline_in_an_ai_layer(built_studies: dict[str, BuiltStudy]):
    study = built_studies["RG3"]
    gsps = _one(study, "PR")
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    assert [layer.GraphicLayer for layer in gsps.GraphicLayerSequence] == ["AI_TESTVLM"]
    (annotation,) = gsps.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == study.source.SOPInstanceUID
    boxes = [f.box for f in study.result.findings if f.box is not None]
    drawn = [np.asarray(g.GraphicData, dtype=np.float32).reshape(-1, 2) for g in annotation.GraphicObjectSequence]
    assert len(drawn) == len(boxes)
    for points, box in zip(drawn, boxes, strict=True):
        assert g_type_closed(points)
        np.testing.assert_array_equal(points, np.asarray(box.polyline(), dtype=np.float32))
    labels = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
    assert labels == ["1 nodule (0.91)", "2 odd shadow"]


def g_type_closed(points: np.ndarray) -> bool:
    return len(points) == 5 and bool(np.array_equal(points[0], points[-1]))


def test_gsps_keeps_the_source_window(built_studies: dict[str, BuiltStudy]):
    study = built_studies["RG1"]
    gsps = _one(study, "PR")
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowCenter) == float(study.source.WindowCenter)
    assert float(voi.WindowWidth) == float(study.source.WindowWidth)
    ct = _one(built_studies["CT693"], "PR")
    assert float(ct.RescaleIntercept) == float(built_studies["CT693"].source.RescaleIntercept)


def test_colour_sources_get_a_colour_presentation_state(built_studies: dict[str, BuiltStudy]):
    for name in ("US1", "USMF"):
        assert _one(built_studies[name], "PR").SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.2"


def test_multiframe_annotations_reference_their_frames(built_studies: dict[str, BuiltStudy]):
    study = built_studies["USMF"]
    gsps = _one(study, "PR")
    frames = sorted(
        int(a.ReferencedImageSequence[0].ReferencedFrameNumber) for a in gsps.GraphicAnnotationSequence
    )
    assert frames == [1, 2, 120]
    sr_frames = sorted(f.source.frame_number for f in study.result.findings if f.source is not None)
    assert frames == sr_frames


def test_seg_holds_the_mask_and_the_box_regions(built_studies: dict[str, BuiltStudy]):
    study = built_studies["RG3"]
    seg = hd.seg.segread(study.of_modality("SEG")[0][1])
    assert seg.SegmentationType == "BINARY"
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["nodule", "odd shadow"]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[study.source.SOPInstanceUID], segment_numbers=[1, 2]
    )
    rows, cols = int(study.source.Rows), int(study.source.Columns)
    nodule, shadow = study.result.findings[0], study.result.findings[1]
    assert nodule.box is not None and shadow.box is not None and shadow.mask is not None
    np.testing.assert_array_equal(pixels[0, :, :, 0], box_mask(nodule.box, rows, cols))
    np.testing.assert_array_equal(pixels[0, :, :, 1], shadow.mask)
    uids = {s.TrackingUID for s in seg.SegmentSequence}
    assert len(uids) == 2


def test_seg_over_a_ct_series_references_the_right_slices():
    series = synthetic_series(read("693_UNCI.dcm"), 6, seed="seg-test")
    rows, cols = int(series[0].Rows), int(series[0].Columns)
    box_a, box_b = BoundingBox(100, 100, 180, 160), BoundingBox(300, 200, 360, 290)
    findings = [
        Finding("nodule", "on slice 2", box=box_a, source=ImageRef(series[1].SOPInstanceUID),
                mask=ellipse_mask(rows, cols, box_a)),
        Finding("mass", "on slice 5", box=box_b, source=ImageRef(series[4].SOPInstanceUID),
                mask=ellipse_mask(rows, cols, box_b)),
    ]
    result = synthetic_result(series[0], STUDIES["CT693"][1], findings=findings)
    uids = ResultUIDs(result.study_instance_uid, ALGORITHM, result.profile)
    objects = build_result_objects(result, series, uids, ResultOptions(sr=False, gsps=False))
    (seg,) = objects
    seg = hd.seg.Segmentation.from_dataset(seg)
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    for number, f in enumerate(findings, start=1):
        assert f.source is not None and f.mask is not None
        for ds in (series[1], series[4]):
            plane = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[ds.SOPInstanceUID], segment_numbers=[number]
            )[0, :, :, 0]
            if ds.SOPInstanceUID == f.source.sop_instance_uid:
                np.testing.assert_array_equal(plane, f.mask)
            else:
                assert not plane.any()
    referenced = {
        fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for fg in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == {series[1].SOPInstanceUID, series[4].SOPInstanceUID}


def test_secondary_capture_has_boxes_burned_in_and_says_it_is_ai(built_studies: dict[str, BuiltStudy]):
    study = built_studies["RG3"]
    sc = _one(study, "OT")
    assert sc.BurnedInAnnotation == "YES"
    assert "AI" in sc.SeriesDescription and "not verified" in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == study.source.SOPInstanceUID
    pixels = sc.pixel_array
    box = study.result.findings[1].box  # integer edges
    assert box is not None
    x0, y0, x1 = int(box.x0), int(box.y0), int(box.x1)
    yellow = np.array([255, 255, 0], dtype=np.uint8)
    assert (pixels[y0 + 5, x0] == yellow).all()  # left edge of the box
    assert (pixels[y0 + 5, x1 - 1] == yellow).all()  # right edge on the last covered pixel
    assert not (pixels[y0 + 5, (x0 + x1) // 2] == yellow).all()  # inside stays the image
    assert (pixels[2:6, 2:6] == 0).all()  # the AI OUTPUT banner's background in the corner


def test_retry_gives_the_same_uids_and_overwrites_files(tmp_path):
    source = read("RG3_UNCI.dcm")
    result = synthetic_result(source, STUDIES["RG3"][1])
    uids = ResultUIDs(result.study_instance_uid, ALGORITHM, result.profile, run=3)
    first = write_result_objects(result, [source], uids, tmp_path, ResultOptions.all())
    again = write_result_objects(
        result, [source], ResultUIDs(result.study_instance_uid, ALGORITHM, result.profile, run=3), tmp_path,
        ResultOptions.all(),
    )
    assert first == again
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in first)
    for path in first:
        ds = dcmread(path, stop_before_pixels=True)
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
    rerun = build_result_objects(
        result, [source], ResultUIDs(result.study_instance_uid, ALGORITHM, result.profile, run=4)
    )
    assert not {ds.SOPInstanceUID for ds in rerun} & {p.stem for p in first}


def test_encoded_objects_are_the_files_written_under_the_same_names(tmp_path):
    """The node writes each object once from :func:`encode_result_object`: the file a library user gets (the same
    name, UIDs and encoding; creation times differ between two builds)."""
    from sr_writer.api import encode_result_object, result_file_name

    source = read("RG3_UNCI.dcm")
    result = synthetic_result(source, STUDIES["RG3"][1])
    uids = ResultUIDs(result.study_instance_uid, ALGORITHM, result.profile, run=1)
    written = write_result_objects(result, [source], uids, tmp_path, ResultOptions.all())
    built = build_result_objects(result, [source], uids, ResultOptions.all())
    assert [result_file_name(ds) for ds in built] == [p.name for p in written]
    for ds, path in zip(built, written, strict=True):
        data = encode_result_object(ds)
        assert data[:132] == path.read_bytes()[:132] == b"\0" * 128 + b"DICM"  # Part 10, as the library writes
        decoded, on_disk = dcmread(io.BytesIO(data)), dcmread(path)
        assert decoded.file_meta.TransferSyntaxUID == on_disk.file_meta.TransferSyntaxUID
        assert (decoded.SOPClassUID, decoded.SOPInstanceUID) == (on_disk.SOPClassUID, on_disk.SOPInstanceUID)
        assert decoded.Modality == on_disk.Modality
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):  # pydicom says so, and lets it be set
        built[0].SOPInstanceUID = "../1.2.3"
    with pytest.raises(ValueError, match="not a valid UID"):
        result_file_name(built[0])


def test_series_numbers_are_fixed_per_kind(built_studies: dict[str, BuiltStudy]):
    numbers = {ds.Modality: int(ds.SeriesNumber) for ds in built_studies["MR2"].objects}
    assert numbers == {"SR": 9001, "PR": 9002, "SEG": 9003, "OT": 9004}


@pytest.mark.parametrize("name", ["RG1", "USMF"])
def test_code_strings_stay_ascii_with_chinese_text(name: str, built_studies: dict[str, BuiltStudy]):
    for ds in built_studies[name].objects:
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        for elem in ds.iterall():
            if elem.VR == "CS" and isinstance(elem.value, str):
                assert elem.value.isascii(), elem


def test_chinese_labels_survive_in_gsps_and_seg_files(built_studies: dict[str, BuiltStudy]):
    study = built_studies["RG1"]
    gsps = dcmread(study.of_modality("PR")[0][1])
    texts = [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence for t in a.TextObjectSequence]
    assert texts[0].startswith("1 左肺结节")
    seg = dcmread(study.of_modality("SEG")[0][1], stop_before_pixels=True)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["左肺结节", "异常阴影"]


def test_image_library_lists_located_sources_or_every_source_on_request():
    series = synthetic_series(read("693_UNCI.dcm"), 6, seed="library-test")
    finding = Finding("nodule", "x", box=BoundingBox(10, 10, 50, 50), source=ImageRef(series[2].SOPInstanceUID))
    result = synthetic_result(series[0], STUDIES["CT693"][1], findings=[finding])
    uids = ResultUIDs(result.study_instance_uid, ALGORITHM, result.profile)

    def library(options: ResultOptions) -> list[str]:
        (sr,) = build_result_objects(result, series, uids, options)
        (container,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
        return [
            entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for group in container.ContentSequence
            for entry in group.ContentSequence
            if entry.ValueType == "IMAGE"
        ]

    only_sr = ResultOptions(gsps=False, seg=False)
    assert library(only_sr) == [series[2].SOPInstanceUID]
    everything = ResultOptions(gsps=False, seg=False, library_all_sources=True)
    assert sorted(library(everything)) == sorted(ds.SOPInstanceUID for ds in series)
    (sr,) = build_result_objects(result, series, uids, only_sr)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert len(evidence) == len(series)


def test_mask_without_box_gets_the_mask_extent_as_box():
    source = read("MR2_UNCI.dcm")
    box = BoundingBox(200, 300, 260, 340)
    mask = box_mask(box, int(source.Rows), int(source.Columns))
    finding = Finding("lesion", "from a mask", source=ImageRef(source.SOPInstanceUID), mask=mask)
    result = synthetic_result(source, STUDIES["MR2"][1], findings=[finding])
    uids = ResultUIDs(result.study_instance_uid, ALGORITHM, result.profile)
    sr, gsps, seg = build_result_objects(result, [source], uids)
    from sr_writer.render import read_findings

    (reported,) = read_findings(sr)
    assert reported.box == box
    assert seg.Modality == "SEG" and gsps.Modality == "PR"


def test_uids_come_from_the_caller_seed():
    source = read("RG3_UNCI.dcm")
    result = synthetic_result(source, STUDIES["RG3"][1])
    uids = ResultUIDs(result.study_instance_uid, ALGORITHM, result.profile, run=1)
    objects = build_result_objects(result, [source], uids, ResultOptions.all())
    by_modality = {ds.Modality: ds for ds in objects}
    assert by_modality["SR"].SOPInstanceUID == uids.uid("sr", "instance")
    assert by_modality["SR"].SeriesInstanceUID == uids.uid("sr", "series")
    assert by_modality["PR"].SOPInstanceUID == uids.uid("gsps", "instance", source.SOPInstanceUID)
    assert by_modality["SEG"].SOPInstanceUID == uids.uid("seg", "instance", "image", source.SOPInstanceUID)
    assert by_modality["OT"].SOPInstanceUID == uids.uid("sc", "instance", source.SOPInstanceUID, 1)
    assert all(len(ds.SOPInstanceUID) <= 64 for ds in objects)


def test_seg_of_a_multiframe_image_puts_each_region_on_its_frame(built_studies: dict[str, BuiltStudy]):
    study = built_studies["ECT"]
    seg = hd.seg.segread(study.of_modality("SEG")[0][1])
    frames = int(study.source.NumberOfFrames)
    for number, finding in enumerate([f for f in study.result.findings if f.box is not None], start=1):
        assert finding.source is not None and finding.box is not None
        for frame in range(1, frames + 1):
            plane = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=study.source.SOPInstanceUID,
                source_frame_numbers=[frame],
                segment_numbers=[number],
            )[0, :, :, 0]
            if frame == finding.source.frame_number:
                expected = finding.mask if finding.mask is not None else box_mask(
                    finding.box, int(study.source.Rows), int(study.source.Columns)
                )
                np.testing.assert_array_equal(plane, expected)
            else:
                assert not plane.any()
