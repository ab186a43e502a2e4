"""Coding of model labels: a small table of common findings and anatomy mapped to SNOMED CT.

Models name findings in free text ("nodule", "左肺结节", "pleural effusion"). :func:`finding_type_for` and
:func:`finding_site_for` turn the common ones into coded concepts for TID 1410 (Finding Type, Finding Site); a label
not in the table returns ``None`` and stays as text (the tracking identifier and the comment carry it).

Concepts come from pydicom's code dictionary where it has them; the few it lacks are SNOMED CT concept IDs written
once, here. Matching is on a normalised label (lower case, punctuation and spaces folded); Chinese terms match as
substrings because Chinese labels are not space-delimited.
"""

from __future__ import annotations

import re

from pydicom.sr.codedict import codes

from sr_writer.findings import Code, Language

__all__ = [
    "FINDING_SITES",
    "FINDING_TYPES",
    "LATERALITIES",
    "finding_site_for",
    "finding_type_for",
    "laterality_for",
    "localized",
]


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


def _from_dict(code: object) -> Code:
    return Code(code.value, code.scheme_designator, code.meaning)  # type: ignore[attr-defined]


_NODULE = _from_dict(codes.SCT.Nodule)
_MASS = _from_dict(codes.SCT.Mass)
_PNEUMOTHORAX = _from_dict(codes.SCT.Pneumothorax)
_EFFUSION = _from_dict(codes.SCT.PleuralEffusion)
_CARDIOMEGALY = _from_dict(codes.SCT.Cardiomegaly)
_LESION = _from_dict(codes.SCT.Lesion)
_TUMOR = _from_dict(codes.SCT.Tumor)
_EDEMA = _from_dict(codes.SCT.PulmonaryEdema)
_HEMORRHAGE = _from_dict(codes.SCT.Hemorrhage)
_CYST = _from_dict(codes.SCT.Cyst)
_FIBROSIS = _from_dict(codes.SCT.Fibrosis)
_LYMPHADENOPATHY = _from_dict(codes.SCT.Lymphadenopathy)
_ANEURYSM = _from_dict(codes.SCT.Aneurysm)
# Not in pydicom's dictionary: SNOMED CT concept IDs.
_FRACTURE = _sct("125605004", "Fracture of bone")
_ATELECTASIS = _sct("46621007", "Atelectasis")
_CONSOLIDATION = _sct("95436008", "Lung consolidation")
_PNEUMONIA = _sct("233604007", "Pneumonia")
_EMPHYSEMA = _sct("87433001", "Pulmonary emphysema")

# (normalised English terms, Chinese terms, code). Longer, more specific terms first.
FINDING_TYPES: tuple[tuple[tuple[str, ...], tuple[str, ...], Code], ...] = (
    (("pleural effusion", "effusion"), ("胸腔积液", "胸水", "积液"), _EFFUSION),
    (("pneumothorax",), ("气胸",), _PNEUMOTHORAX),
    (("pulmonary nodule", "lung nodule", "nodule"), ("结节",), _NODULE),
    (("mass",), ("肿块",), _MASS),
    (("cardiomegaly", "enlarged heart"), ("心脏增大", "心影增大"), _CARDIOMEGALY),
    (("fracture",), ("骨折",), _FRACTURE),
    (("atelectasis",), ("肺不张",), _ATELECTASIS),
    (("consolidation",), ("实变",), _CONSOLIDATION),
    (("pneumonia",), ("肺炎",), _PNEUMONIA),
    (("emphysema",), ("肺气肿",), _EMPHYSEMA),
    (("pulmonary edema", "edema", "oedema"), ("肺水肿", "水肿"), _EDEMA),
    (("hemorrhage", "haemorrhage", "bleed"), ("出血",), _HEMORRHAGE),
    (("cyst",), ("囊肿",), _CYST),
    (("fibrosis",), ("纤维化",), _FIBROSIS),
    (("lymphadenopathy",), ("淋巴结肿大",), _LYMPHADENOPATHY),
    (("aneurysm",), ("动脉瘤",), _ANEURYSM),
    (("tumor", "tumour"), ("肿瘤",), _TUMOR),
    (("lesion",), ("病灶", "病变"), _LESION),
)

FINDING_SITES: tuple[tuple[tuple[str, ...], tuple[str, ...], Code], ...] = (
    (("lung", "pulmonary"), ("肺",), _from_dict(codes.SCT.Lung)),
    (("pleura", "pleural"), ("胸膜", "胸腔"), _from_dict(codes.SCT.Pleura)),
    (("heart", "cardiac"), ("心脏",), _from_dict(codes.SCT.Heart)),
    (("mediastinum", "mediastinal"), ("纵隔",), _from_dict(codes.SCT.Mediastinum)),
    (("liver", "hepatic"), ("肝",), _from_dict(codes.SCT.Liver)),
    (("kidney", "renal"), ("肾",), _from_dict(codes.SCT.Kidney)),
    (("brain", "cerebral"), ("脑",), _from_dict(codes.SCT.Brain)),
    (("aorta", "aortic"), ("主动脉",), _from_dict(codes.SCT.Aorta)),
    (("spleen", "splenic"), ("脾",), _from_dict(codes.SCT.Spleen)),
    (("pancreas", "pancreatic"), ("胰",), _from_dict(codes.SCT.Pancreas)),
    (("thyroid",), ("甲状腺",), _from_dict(codes.SCT.Thyroid)),
    (("breast",), ("乳腺", "乳房"), _from_dict(codes.SCT.Breast)),
    (("clavicle",), ("锁骨",), _from_dict(codes.SCT.Clavicle)),
    (("humerus",), ("肱骨",), _from_dict(codes.SCT.Humerus)),
    (("femur",), ("股骨",), _from_dict(codes.SCT.Femur)),
    (("hand",), ("手部",), _from_dict(codes.SCT.Hand)),
    (("foot",), ("足部",), _from_dict(codes.SCT.Foot)),
    (("knee",), ("膝",), _from_dict(codes.SCT.Knee)),
    (("bone",), ("骨",), _from_dict(codes.SCT.Bone)),
)

_NON_WORD = re.compile(r"[^\w]+")


def _normalise(label: str) -> str:
    return " " + _NON_WORD.sub(" ", label.lower()).strip() + " "


def _lookup(label: str, table: tuple[tuple[tuple[str, ...], tuple[str, ...], Code], ...]) -> Code | None:
    norm = _normalise(label)
    for english, chinese, code in table:
        if any(f" {term} " in norm for term in english) or any(term in label for term in chinese):
            return code
    return None


def finding_type_for(label: str) -> Code | None:
    """The coded finding type for a model label (English or Chinese), or ``None`` when the table lacks it."""
    return _lookup(label, FINDING_TYPES)


def finding_site_for(label: str) -> Code | None:
    """The coded anatomic site named in ``label`` (e.g. "lung" in "lung nodule"), or ``None``."""
    return _lookup(label, FINDING_SITES)


# Laterality (TID 1410 Finding Site row, HAS CONCEPT MOD (272741003, SCT, "Laterality"), CID 244 values).
_LEFT = _from_dict(codes.SCT.Left)
_RIGHT = _from_dict(codes.SCT.Right)
_BILATERAL = _from_dict(codes.SCT.Bilateral)

#: (normalised English terms, Chinese terms, code); "both" and "bilateral" first: "双" also reads as both sides.
LATERALITIES: tuple[tuple[tuple[str, ...], tuple[str, ...], Code], ...] = (
    (("bilateral", "both"), ("双",), _BILATERAL),
    (("left",), ("左",), _LEFT),
    (("right",), ("右",), _RIGHT),
)

#: Chinese meanings of the coded concepts above, for reports whose language is Chinese: the Code Meaning is the
#: text a viewer shows (OHIF draws a Finding Site's Code Meaning next to the box), and PS3.3 8.3 lets it be in the
#: language of the content while the code value and scheme carry the concept.
_CHINESE_MEANINGS: dict[tuple[str, str], str] = {
    (code.value, code.scheme_designator): chinese[0]
    for table in (FINDING_TYPES, FINDING_SITES, LATERALITIES)
    for _, chinese, code in table
}


def laterality_for(text: str) -> Code | None:
    """The laterality ``text`` names (English or Chinese): Left, Right, or Bilateral when it names both sides or
    says "bilateral"; ``None`` when it names none."""
    norm = _normalise(text)
    found = [
        code for english, chinese, code in LATERALITIES
        if any(f" {term} " in norm for term in english) or any(term in text for term in chinese)
    ]
    if not found:
        return None
    if _BILATERAL in found or (_LEFT in found and _RIGHT in found):
        return _BILATERAL
    return found[0]


def localized(code: Code, language: Language | str) -> Code:
    """``code`` with its meaning in ``language`` when the table has one (Chinese), else ``code`` unchanged."""
    if Language(language) is Language.CHINESE:
        meaning = _CHINESE_MEANINGS.get((code.value, code.scheme_designator))
        if meaning:
            return Code(code.value, code.scheme_designator, meaning)
    return code
