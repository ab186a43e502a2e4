"""The findings contract: grounded findings as the inference library produces them and the SR writer consumes them.

This is the one definition shared by ``inference/`` and ``sr_writer/``. It is a plain module: standard library and
numpy only (no torch, no highdicom), so that any process can import it cheaply.

Coordinates: a :class:`BoundingBox` lives in the *source image's pixel space*, (column, row) with (0, 0) at the
top-left corner of the top-left pixel, on pixel edges. A box covering pixel indices ``i..j`` inclusive spans edges
``i`` and ``j + 1``. Model-specific coordinate systems never leave the adapters (DESIGN invariant 7).

Results travel between processes as JSON (:meth:`InferenceResult.to_json` / :meth:`InferenceResult.from_json`);
masks are packed bits, base64-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np

__all__ = [
    "AlgorithmIdentity",
    "BoundingBox",
    "Code",
    "Finding",
    "ImageRef",
    "InferenceResult",
    "Language",
    "Report",
    "result_uid",
    "uid_hash",
]


class Language(str, Enum):
    """Language of the model's text, as an RFC 5646 tag."""

    ENGLISH = "en"
    CHINESE = "zh"


@dataclass(frozen=True)
class Code:
    """A coded concept (value, coding scheme designator, meaning), e.g. ``Code("39607008", "SCT", "Lung")``."""

    value: str
    scheme_designator: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("value", "scheme_designator", "meaning"):
            if not getattr(self, name):
                raise ValueError(f"Code.{name} must not be empty, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class BoundingBox:
    """An axis-aligned box in source pixel space: column/row pixel edges, ``x0 < x1`` and ``y0 < y1``."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        values = (self.x0, self.y0, self.x1, self.y1)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"BoundingBox coordinates must be finite, got {values}")
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"BoundingBox must have positive area (x0 < x1, y0 < y1), got {values}")

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    def clipped(self, columns: int, rows: int) -> BoundingBox | None:
        """This box clipped to an image of ``columns`` x ``rows``; ``None`` when nothing of it is inside."""
        x0, x1 = max(0.0, min(self.x0, columns)), max(0.0, min(self.x1, columns))
        y0, y1 = max(0.0, min(self.y0, rows)), max(0.0, min(self.y1, rows))
        if x1 <= x0 or y1 <= y0:
            return None
        return BoundingBox(x0, y0, x1, y1)

    def iou(self, other: BoundingBox) -> float:
        ix = max(0.0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0.0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def polyline(self) -> list[tuple[float, float]]:
        """The closed 5-point polyline (column, row) that SR and GSPS use for a rectangle."""
        return [(self.x0, self.y0), (self.x1, self.y0), (self.x1, self.y1), (self.x0, self.y1), (self.x0, self.y0)]

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass(frozen=True)
class ImageRef:
    """One source image: SOP Instance UID and 1-based frame number (1 for single-frame objects)."""

    sop_instance_uid: str
    frame_number: int = 1

    def __post_init__(self) -> None:
        if not self.sop_instance_uid:
            raise ValueError("ImageRef.sop_instance_uid must not be empty")
        if self.frame_number < 1:
            raise ValueError(f"ImageRef.frame_number is 1-based, got {self.frame_number}")


@dataclass(frozen=True)
class Finding:
    """One grounded finding.

    ``box`` and ``source`` go together: a finding with a box always names the image it lies on. A finding with
    neither is a text-only finding (the model named something it did not locate). ``mask``, when given, is a
    boolean array of the source image's (rows, columns).
    """

    label: str
    text: str = ""
    box: BoundingBox | None = None
    source: ImageRef | None = None
    code: Code | None = None
    site: Code | None = None
    score: float | None = None
    language: Language = Language.ENGLISH
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.label or not self.label.strip():
            raise ValueError("Finding.label must not be empty")
        if self.box is not None and self.source is None:
            raise ValueError(f"Finding {self.label!r} has a box but no source image")
        if self.mask is not None:
            if self.source is None:
                raise ValueError(f"Finding {self.label!r} has a mask but no source image")
            if self.mask.ndim != 2:
                raise ValueError(f"Finding.mask must be 2-D (rows, columns), got shape {self.mask.shape}")
        if self.score is not None and not (0.0 <= self.score <= 1.0):
            raise ValueError(f"Finding.score must be within [0, 1], got {self.score}")
        object.__setattr__(self, "language", Language(self.language))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "text": self.text, "language": self.language.value}
        if self.box is not None:
            out["box"] = self.box.as_list()
        if self.source is not None:
            out["source"] = {"sop_instance_uid": self.source.sop_instance_uid, "frame": self.source.frame_number}
        for name in ("code", "site"):
            code = getattr(self, name)
            if code is not None:
                out[name] = [code.value, code.scheme_designator, code.meaning]
        if self.score is not None:
            out["score"] = self.score
        if self.mask is not None:
            mask = np.asarray(self.mask, dtype=bool)
            out["mask"] = {
                "shape": list(mask.shape),
                "bits": base64.b64encode(np.packbits(mask, axis=None).tobytes()).decode("ascii"),
            }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        mask = None
        if "mask" in data:
            shape = tuple(data["mask"]["shape"])
            bits = np.frombuffer(base64.b64decode(data["mask"]["bits"]), dtype=np.uint8)
            mask = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
        source = data.get("source")
        return cls(
            label=data["label"],
            text=data.get("text", ""),
            box=BoundingBox(*data["box"]) if "box" in data else None,
            source=ImageRef(source["sop_instance_uid"], int(source["frame"])) if source else None,
            code=Code(*data["code"]) if "code" in data else None,
            site=Code(*data["site"]) if "site" in data else None,
            score=data.get("score"),
            language=Language(data.get("language", "en")),
            mask=mask,
        )


@dataclass(frozen=True)
class Report:
    """The narrative report: findings and impression text, in one language."""

    findings: str = ""
    impression: str = ""
    language: Language = Language.ENGLISH

    def __post_init__(self) -> None:
        object.__setattr__(self, "language", Language(self.language))


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Who produced the findings: recorded in the SR (TID 4019, Contributing Equipment) and in result UIDs.

    ``version`` changes whenever the weights change (a checkpoint hash is a good version); ``parameters`` are the
    generation settings worth recording (profile, max tokens, decoding).
    """

    name: str
    version: str
    family: str
    manufacturer: str = "DICOM AI node"
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("name", "version", "family"):
            if not getattr(self, name):
                raise ValueError(f"AlgorithmIdentity.{name} must not be empty")

    @property
    def device_uid(self) -> str:
        """A UID for the algorithm as a device; it changes when the model (family, name, version) changes."""
        return result_uid("device", self.family, self.name, self.version)


@dataclass(frozen=True)
class InferenceResult:
    """Everything one inference run says about one study."""

    study_instance_uid: str
    profile: str
    algorithm: AlgorithmIdentity
    findings: tuple[Finding, ...] = ()
    report: Report = field(default_factory=Report)
    language: Language = Language.ENGLISH

    def __post_init__(self) -> None:
        object.__setattr__(self, "findings", tuple(self.findings))
        object.__setattr__(self, "language", Language(self.language))

    def with_findings(self, findings: Sequence[Finding]) -> InferenceResult:
        return replace(self, findings=tuple(findings))

    def to_json(self) -> str:
        return json.dumps(
            {
                "study_instance_uid": self.study_instance_uid,
                "profile": self.profile,
                "language": self.language.value,
                "algorithm": {
                    "name": self.algorithm.name,
                    "version": self.algorithm.version,
                    "family": self.algorithm.family,
                    "manufacturer": self.algorithm.manufacturer,
                    "parameters": dict(self.algorithm.parameters),
                },
                "report": {
                    "findings": self.report.findings,
                    "impression": self.report.impression,
                    "language": self.report.language.value,
                },
                "findings": [f.to_dict() for f in self.findings],
            },
            ensure_ascii=False,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> InferenceResult:
        data = json.loads(text)
        return cls(
            study_instance_uid=data["study_instance_uid"],
            profile=data["profile"],
            language=Language(data["language"]),
            algorithm=AlgorithmIdentity(**data["algorithm"]),
            report=Report(**data["report"]),
            findings=tuple(Finding.from_dict(f) for f in data["findings"]),
        )


def uid_hash(uid: str | None) -> str:
    """A short, stable stand-in for a UID in logs and error messages (no patient data in logs, DESIGN invariant 8):
    the first 12 hex digits of its SHA-256, ``-`` for none. The one definition: the node, the workers and both
    libraries name a UID by the same 12 characters, so one grep follows an instance through every log."""
    if not uid:
        return "-"
    return hashlib.sha256(str(uid).encode("ascii", "replace")).hexdigest()[:12]


def result_uid(*parts: str | int) -> str:
    """A deterministic UID under the 2.25 root derived from ``parts``.

    The same parts always give the same UID, so a retried job regenerates identical result objects and a PACS that
    receives them twice overwrites instead of duplicating (DESIGN invariant 2). Callers pass, for example,
    ``(study_uid, algorithm.family, algorithm.version, profile, run, "sr", "series")``.
    """
    if not parts:
        raise ValueError("result_uid needs at least one part")
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    # 2.25.<decimal of a 128-bit integer> is at most 2 + 1 + 2 + 39 = 44 characters, under the 64 allowed.
    return "2.25." + str(int.from_bytes(digest[:16], "big"))
