"""Routing rules: which complete studies are processed, and with which task profile.

The first rule whose every criterion holds for the study wins. A study that matches no rule is stored and its
job marked skipped, with the reason visible in ``dicom-node jobs show``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.uid import UID

from dicom_node.config import MatchSettings, RuleSettings
from dicom_node.store import InstanceRecord

__all__ = ["RuleDecision", "select_rule"]


@dataclass(frozen=True)
class RuleDecision:
    rule: RuleSettings | None
    reason: str


def _sop_class_matches(wanted: Sequence[str], have: set[str]) -> bool:
    for item in wanted:
        for uid in have:
            if item == uid or item.lower() == UID(uid).keyword.lower() or item.lower() == UID(uid).name.lower():
                return True
    return False


def _mismatch(match: MatchSettings, found: Sequence[InstanceRecord], calling_ae: str) -> str | None:
    """Why ``match`` does not hold for a study made of ``found``; None when it holds."""

    def values(attr: str) -> set[str]:
        return {str(getattr(i, attr)).strip() for i in found if getattr(i, attr)}

    checks: list[tuple[str, list[str], set[str]]] = [
        ("Modality", match.modality, values("modality")),
        ("BodyPartExamined", match.body_part, values("body_part")),
    ]
    for name, wanted, have in checks:
        if wanted and not {w.upper() for w in wanted} & {h.upper() for h in have}:
            return f"{name} {sorted(have) or '(absent)'} not in {wanted}"
    if match.sop_class and not _sop_class_matches(match.sop_class, values("sop_class_uid")):
        return f"SOP Class {sorted(values('sop_class_uid'))} not in {match.sop_class}"
    if match.calling_ae and calling_ae not in match.calling_ae:
        return f"calling AE title {calling_ae!r} not in {match.calling_ae}"
    for name, pattern, attr in (
        ("StudyDescription", match.study_description, "study_description"),
        ("SeriesDescription", match.series_description, "series_description"),
    ):
        if pattern is None:
            continue
        regex = re.compile(pattern, re.IGNORECASE)
        have = values(attr) or {""}
        if not any(regex.search(v) for v in have):
            return f"{name} does not match /{pattern}/"
    return None


def select_rule(rules: Sequence[RuleSettings], found: Sequence[InstanceRecord], calling_ae: str) -> RuleDecision:
    """The first rule that matches the study, or None with the reason each rule gave."""
    if not rules:
        return RuleDecision(None, "no routing rules are configured")
    reasons = []
    for rule in rules:
        why = _mismatch(rule.match, found, calling_ae)
        if why is None:
            return RuleDecision(rule, f"matched rule {rule.name!r}")
        reasons.append(f"{rule.name}: {why}")
    return RuleDecision(None, "no rule matched (" + "; ".join(reasons) + ")")
