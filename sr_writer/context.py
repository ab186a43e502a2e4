"""What every writer shares: the options, the checked findings, equipment and series identity, character set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from sr_writer.findings import InferenceResult, Language
from sr_writer.kinds import ObjectKind
from sr_writer.prepare import PreparedFinding, SourceIndex, prepare_findings
from sr_writer.text import LO_MAX, needs_utf8, single_line
from sr_writer.uids import ResultUIDs

__all__ = ["UTF8", "BuildContext", "ObjectKind", "ResultOptions"]

UTF8 = "ISO_IR 192"
WRITER_NAME = "sr_writer"
WRITER_VERSION = "0.1.0"


# Series numbers are fixed per kind (never random) so a retry lands in the same series.
_SERIES_OFFSET = {ObjectKind.SR: 1, ObjectKind.GSPS: 2, ObjectKind.SEG: 3, ObjectKind.SC: 4}
_SERIES_TITLE = {
    ObjectKind.SR: "AI report",
    ObjectKind.GSPS: "AI boxes",
    ObjectKind.SEG: "AI regions",
    ObjectKind.SC: "AI image",
}


@dataclass(frozen=True)
class ResultOptions:
    """Which objects to build, and how.

    ``seg`` builds a SEG when at least one finding carries a mask; with ``seg_boxes`` findings without a mask add
    their filled box as a segment too. ``sc`` (burned-in Secondary Capture) is off by default: it duplicates pixel
    data and carries no machine-readable meaning. ``series_number_base`` + 1..4 are the series numbers of SR, GSPS,
    SEG and SC. ``min_box_pixels``: boxes narrower or shorter than this after clipping are dropped.
    ``library_all_sources`` lists every source image in the SR's Image Library, not only those carrying a region
    (about 3 ms per image; every source image is in the evidence sequence anyway).
    """

    sr: bool = True
    gsps: bool = True
    seg: bool = True
    seg_boxes: bool = False
    sc: bool = False
    min_box_pixels: float = 1.0
    series_number_base: int = 9000
    institution_name: str | None = None
    library_all_sources: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.series_number_base <= 2**31 - 10:
            raise ValueError(f"series_number_base must be within [0, 2**31 - 10], got {self.series_number_base}")
        if self.min_box_pixels <= 0:
            raise ValueError(f"min_box_pixels must be positive, got {self.min_box_pixels}")

    @classmethod
    def all(cls) -> ResultOptions:
        """Every object type, with box-filled SEG regions."""
        return cls(sr=True, gsps=True, seg=True, seg_boxes=True, sc=True)


class BuildContext:
    """One run's shared state: checked findings, identity of the algorithm as equipment, character set."""

    def __init__(
        self, result: InferenceResult, sources: Sequence[Dataset], uids: ResultUIDs, options: ResultOptions
    ) -> None:
        if uids.study_instance_uid != result.study_instance_uid:
            raise ValueError("uids was made for another study than result.study_instance_uid")
        self.result = result
        self.options = options
        self.uids = uids
        self.sources = SourceIndex(sources, result.study_instance_uid)
        self.findings: list[PreparedFinding] = prepare_findings(
            result, self.sources, uids, options.min_box_pixels
        )
        algorithm = result.algorithm
        self.manufacturer = single_line(algorithm.manufacturer, LO_MAX)
        self.model_name = single_line(algorithm.name, LO_MAX)
        self.software_versions: tuple[str, ...] = (
            single_line(algorithm.version, LO_MAX),
            f"{WRITER_NAME} {WRITER_VERSION}",
        )
        self.device_serial_number = single_line(algorithm.version, LO_MAX)
        texts = [self.manufacturer, self.model_name, *self.software_versions, result.report.findings,
                 result.report.impression, algorithm.family, *algorithm.parameters.values(),
                 *algorithm.parameters.keys()]
        for f in self.findings:
            texts.extend((f.label, f.text))
        # A report in Chinese carries Chinese words of the writer's own (the no-findings text) even when the
        # model's are all ASCII or absent.
        chinese = result.language is Language.CHINESE
        self.specific_character_set: str | None = UTF8 if chinese or needs_utf8(texts) else None

    # -- identity -------------------------------------------------------------------------------------------
    def series_uid(self, kind: ObjectKind) -> str:
        return self.uids.uid(kind.value, "series")

    def instance_uid(self, kind: ObjectKind, *parts: str | int) -> str:
        return self.uids.uid(kind.value, "instance", *parts)

    def series_number(self, kind: ObjectKind) -> int:
        return self.options.series_number_base + _SERIES_OFFSET[kind]

    def series_description(self, kind: ObjectKind, note: str = "") -> str:
        """E.g. ``"AI report - ModelName 1.2"``: names the AI and the model; ``note`` follows the title (``"AI
        report: no findings - ModelName 1.2"``), so that a long model name cannot cut it off."""
        title = f"{_SERIES_TITLE[kind]}: {note}" if note else _SERIES_TITLE[kind]
        return single_line(f"{title} - {self.model_name} {self.software_versions[0]}", LO_MAX)

    def charset_kwargs(self) -> dict[str, str]:
        """``specific_character_set`` for highdicom when UTF-8 is needed; otherwise highdicom copies the source's."""
        return {} if self.specific_character_set is None else {"specific_character_set": UTF8}

    def common_kwargs(self, kind: ObjectKind) -> dict[str, object]:
        out: dict[str, object] = {"series_description": self.series_description(kind), **self.charset_kwargs()}
        return out

    def contributing_equipment(self) -> list[hd.ContributingEquipment]:
        """The algorithm as contributing equipment, as IHE AI Results asks: manufacturer, model name, software
        version, Device UID (changes when the model changes) and Purpose of Reference (Newcode1, 99IHE,
        "Processing Algorithm"). highdicom accepts only CID 7005 purposes when constructing the item, so it is
        built as Processing Equipment and its purpose then replaced by the IHE code.

        dciodvfy (Debian 12) warns that Device UID is not in its IOD tables there; IHE AIR requires it.
        """
        algorithm = self.result.algorithm
        item = hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name,
            software_versions=self.software_versions[0],
            contribution_description=single_line(
                f"AI algorithm {algorithm.family} {algorithm.name} {algorithm.version}", LO_MAX
            ),
        )
        item.DeviceUID = algorithm.device_uid
        item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")]
        return [item]

    # -- helpers ----------------------------------------------------------------------------------------------
    def findings_with_geometry(self) -> list[PreparedFinding]:
        return [f for f in self.findings if f.has_geometry]


def repair_patient_module(target: Dataset) -> None:
    """Fill the Type 1C de-identification method when a copied Patient module says the identity was removed.

    Anonymised test and research images often carry Patient Identity Removed = YES without the method; the
    result object cannot know it either, and says so rather than failing validation.
    """
    if str(target.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
        target.get("DeidentificationMethod") or target.get("DeidentificationMethodCodeSequence")
    ):
        target.DeidentificationMethod = "Unknown: identity removed before the images reached the AI node"


def copy_image_context(target: Dataset, source: Dataset, laterality: bool = True) -> None:
    """Series/image attributes dciodvfy asks for in image-related IODs (GSPS, SEG, SC), taken from the source.

    Body Part Examined is copied when present; Laterality (General Series, Type 2C) is copied when present, and
    written empty when the source names neither laterality nor body part (GSPS, SC: dciodvfy then cannot rule
    out a paired body part and requires it). ``laterality=False`` leaves it out (SEG: dciodvfy rejects it
    there). Patient Orientation is handled per IOD by the writers.
    """
    if source.get("BodyPartExamined") and "BodyPartExamined" not in target:
        target.BodyPartExamined = source.BodyPartExamined
    if laterality and "Laterality" not in target:
        if source.get("Laterality"):
            target.Laterality = source.Laterality
        elif not source.get("BodyPartExamined"):
            target.Laterality = ""
    repair_patient_module(target)


def header_view(ds: Dataset) -> Dataset:
    """``ds`` without pixel data, for highdicom constructors that read only the header.

    Elements are shared, not copied (cheap). Two repairs of non-conformant sources, seen in real files, so that
    highdicom can read them: a zero or empty Pixel Spacing is left out (it would be copied into Pixel Measures,
    where it is invalid), and a multi-frame image without functional groups gets empty ones (highdicom reads the
    Modality LUT and VOI from them).
    """
    view = Dataset()
    for elem in ds:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            view.add(elem)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in view:
            values = view[keyword].value
            if not values or (
                not isinstance(values, str | bytes) and any(float(v) <= 0 for v in values)
            ):
                del view[keyword]
    if "NumberOfFrames" in ds and "SharedFunctionalGroupsSequence" not in ds:
        view.SharedFunctionalGroupsSequence = [Dataset()]
    if "NumberOfFrames" in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        view.PerFrameFunctionalGroupsSequence = [Dataset() for _ in range(int(ds.NumberOfFrames or 1))]
    return view
