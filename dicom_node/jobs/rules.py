"""Routing rules: which complete studies are processed, and with which task profile.

The first rule whose every criterion holds for the study wins. A study that matches no rule is stored and its
job marked skipped, with the reason visible in ``dicom-node jobs show``.

Description patterns are searched case-insensitively with the ``regex`` package (the same syntax as ``re``) under
a time limit: a pattern that backtracks catastrophically on a crafted description (``(a|a)+$`` against 64
characters runs for longer than anyone waits) would otherwise hold the assembler. A pattern that runs out of time
does not match; the rule's reason says so and a WARNING names the rule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import regex
from pydicom.uid import UID

from dicom_node.config import MatchSettings, RuleSettings
from dicom_node.jobs.schema import InstanceRecord
from dicom_node.logs import uid_hash

__all__ = [
    "PATTERN_TIME_LIMIT",
    "RuleDecision",
    "explain_rules",
    "nested_quantifier",
    "risky_patterns",
    "select_rule",
]

log = logging.getLogger(__name__)

#: Seconds one description criterion of one rule may take over all of a study's values. A sound pattern needs
#: microseconds for a 64-character description; the limit only has to stay far above that on a loaded machine.
PATTERN_TIME_LIMIT = 1.0


@dataclass(frozen=True)
class RuleDecision:
    rule: RuleSettings | None
    reason: str


class _PatternTimedOut(Exception):
    def __init__(self, attribute: str, pattern: str, limit: float) -> None:
        super().__init__(f"{attribute} pattern /{pattern}/ timed out after {limit:g} s, so the rule does not match")
        self.attribute = attribute
        self.pattern = pattern


def _search(pattern: str, values: set[str], attribute: str, limit: float) -> bool:
    """True when ``pattern`` is found (case-insensitive search) in any of ``values`` within ``limit`` seconds."""
    compiled = regex.compile(pattern, regex.IGNORECASE)
    deadline = time.monotonic() + limit
    for value in sorted(values):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _PatternTimedOut(attribute, pattern, limit)
        try:
            # concurrent: the GIL is released while it matches, so the SCP's threads run meanwhile.
            hit = compiled.search(value, timeout=remaining, concurrent=True)
        except TimeoutError:
            raise _PatternTimedOut(attribute, pattern, limit) from None
        if hit:
            return True
    return False


def _sop_class_matches(wanted: Sequence[str], have: set[str]) -> bool:
    for item in wanted:
        for uid in have:
            if item == uid or item.lower() == UID(uid).keyword.lower() or item.lower() == UID(uid).name.lower():
                return True
    return False


def _mismatch(
    match: MatchSettings, found: Sequence[InstanceRecord], calling_ae: str, time_limit: float = PATTERN_TIME_LIMIT
) -> str | None:
    """Why ``match`` does not hold for a study made of ``found``; None when it holds.

    Raises :class:`_PatternTimedOut` when a description pattern runs out of ``time_limit``.
    """

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
        if not _search(pattern, values(attr) or {""}, name, time_limit):
            return f"{name} does not match /{pattern}/"
    return None


def select_rule(
    rules: Sequence[RuleSettings],
    found: Sequence[InstanceRecord],
    calling_ae: str,
    time_limit: float = PATTERN_TIME_LIMIT,
) -> RuleDecision:
    """The first rule that matches the study, or None with the reason each rule gave.

    A rule whose description pattern runs out of ``time_limit`` seconds does not match: its reason says that its
    pattern timed out, and a WARNING names the rule and the pattern (never the description searched).
    """
    if not rules:
        return RuleDecision(None, "no routing rules are configured")
    reasons = []
    for rule in rules:
        try:
            why = _mismatch(rule.match, found, calling_ae, time_limit)
        except _PatternTimedOut as exc:
            why = str(exc)
            log.warning(
                "rule %r: its %s pattern /%s/ timed out after %g s on study %s; the rule is skipped for this study "
                "(`dicom-node config check` names patterns with nested quantifiers)",
                rule.name, exc.attribute, exc.pattern, time_limit, uid_hash(found[0].study_uid if found else None),
            )
        if why is None:
            return RuleDecision(rule, f"matched rule {rule.name!r}")
        reasons.append(f"{rule.name}: {why}")
    return RuleDecision(None, "no rule matched (" + "; ".join(reasons) + ")")


def explain_rules(
    rules: Sequence[RuleSettings],
    found: Sequence[InstanceRecord],
    calling_ae: str,
    time_limit: float = PATTERN_TIME_LIMIT,
) -> list[tuple[RuleSettings, str | None]]:
    """Every rule with why it does not match the study (None: it matches), in order; the first that matches is the
    one :func:`select_rule` chooses. For the console's rule tester and job pages."""
    out: list[tuple[RuleSettings, str | None]] = []
    for rule in rules:
        try:
            out.append((rule, _mismatch(rule.match, found, calling_ae, time_limit)))
        except _PatternTimedOut as exc:
            out.append((rule, str(exc)))
    return out


# A quantifier: +, *, or a brace count whose upper bound exceeds one ({2}, {1,}, {0,5}); ``?`` is not one here.
_QUANTIFIER = regex.compile(r"[+*]|\{(?:\d+,\d*|\d*,\d+|[2-9]|\d{2,})\}")


def nested_quantifier(pattern: str) -> bool:
    """True when ``pattern`` repeats a group that itself holds a quantifier, as ``(a+)+`` or ``(\\w+\\s?)*``: the
    usual shape of patterns whose search time grows exponentially with the length of a non-matching value.

    A cheap textual check (escapes and character classes are skipped), not a proof either way: ``(a|a)+`` is slow
    without nesting quantifiers, and a nested quantifier over disjoint alternatives can be harmless.
    """
    stack: list[bool] = []  # per open group: whether it holds a quantifier so far
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # a character class: skip to its closing bracket (a leading ] or ^] is literal)
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
            continue
        if c == "(":
            stack.append(False)
        elif c == ")" and stack:
            inner = stack.pop()
            repeated = _QUANTIFIER.match(pattern, i + 1) is not None
            if inner and repeated:
                return True
            if stack and (inner or repeated):
                stack[-1] = True
        elif stack and _QUANTIFIER.match(pattern, i):
            stack[-1] = True
        i += 1
    return False


def risky_patterns(rules: Sequence[RuleSettings]) -> list[str]:
    """One line per description pattern of ``rules`` that :func:`nested_quantifier` flags."""
    found = []
    for position, rule in enumerate(rules):
        for key in ("study_description", "series_description"):
            pattern = getattr(rule.match, key)
            if pattern is not None and nested_quantifier(pattern):
                found.append(
                    f"rules[{position}] ({rule.name}).match.{key}: /{pattern}/ repeats a group that holds a "
                    f"quantifier; such patterns can take exponential time on a crafted description, and are cut "
                    f"off after {PATTERN_TIME_LIMIT:g} s (the rule then does not match)"
                )
    return found
