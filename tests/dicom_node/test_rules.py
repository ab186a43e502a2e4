"""Routing rules: description patterns keep their meaning (search, case-insensitive) and cannot hold the assembler."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import RuleSettings
from dicom_node.jobs.rules import nested_quantifier, select_rule
from dicom_node.jobs.schema import InstanceRecord, JobState
from dicom_node.node import Node
from tests.conftest import make_study
from tests.dicom_node.test_intake import storescu, wait_for

# 63 characters that almost match, then one that cannot: every way of splitting the run is tried.
CRAFTED = "a" * 63 + "!"
# Catastrophic for both engines: `re`, and `regex` (which copes with `(a+)+$` itself, see below).
SLOW = "(a|a)+$"


def study(series_description: str, study_description: str = "", modality: str = "CT") -> list[InstanceRecord]:
    return [
        InstanceRecord(
            sop_instance_uid="1.2.3.4.1", study_uid="1.2.3.4", series_uid="1.2.3.4.2", sop_class_uid="1.2.3",
            transfer_syntax="1.2.840.10008.1.2.1", modality=modality, body_part="", study_description=study_description,
            series_description=series_description, calling_ae="MODALITY", path="x", size=1,
        )
    ]


def rule(name: str, **match: Any) -> RuleSettings:
    return RuleSettings.model_validate({"name": name, "match": match})


@pytest.mark.timeout(30)
def test_a_pattern_that_backtracks_forever_times_out_and_the_reason_names_the_rule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rules = [rule("slow", series_description=SLOW), rule("rest", modality=["MR"])]
    with caplog.at_level(logging.WARNING, logger="dicom_node.jobs.rules"):
        decision = select_rule(rules, study(CRAFTED), "MODALITY")
    assert decision.rule is None
    assert decision.reason.startswith("no rule matched (slow: SeriesDescription pattern /(a|a)+$/ timed out after")
    assert "rest: Modality ['CT'] not in ['MR']" in decision.reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rule 'slow'" in warnings[0] and "timed out" in warnings[0]
    assert CRAFTED not in warnings[0], "the description searched is not logged"


@pytest.mark.timeout(30)
def test_a_timed_out_rule_does_not_match_and_the_next_one_is_tried() -> None:
    rules = [rule("slow", study_description=SLOW), rule("ct", modality=["ct"])]
    decision = select_rule(rules, study("axial", study_description=CRAFTED), "MODALITY")
    assert decision.rule is not None and decision.rule.name == "ct"


@pytest.mark.timeout(30)
def test_the_issues_pattern_finishes_on_a_crafted_description() -> None:
    """`(a+)+$` took seconds per character with `re`; now it is answered (no match) well within the limit."""
    decision = select_rule([rule("nested", series_description="(a+)+$")], study(CRAFTED), "MODALITY")
    assert decision.rule is None
    assert decision.reason in (
        "no rule matched (nested: SeriesDescription does not match /(a+)+$/)",
        "no rule matched (nested: SeriesDescription pattern /(a+)+$/ timed out after 1 s, so the rule does not "
        "match)",
    )


@pytest.mark.parametrize(
    ("pattern", "description", "matches"),
    [
        ("chest", "AX CHEST 1.0mm", True),  # search, not match; case-insensitive
        ("^ax", "Ax chest", True),
        ("^chest", "AX CHEST", False),
        ("^(?!.*scout)", "Scout 0.5", False),  # the example configuration's pattern
        ("^(?!.*scout)", "AX 1.0", True),
        ("肺", "胸部 肺窗", True),
        ("^$", "", True),  # an absent description is searched as ""
        ("(a|a)+$", "aaaa", True),  # a slow pattern on a value it matches at once
    ],
)
def test_patterns_keep_their_meaning(pattern: str, description: str, matches: bool) -> None:
    decision = select_rule([rule("r", series_description=pattern)], study(description), "MODALITY")
    assert (decision.rule is not None) is matches, decision.reason
    if not matches:
        assert decision.reason == f"no rule matched (r: SeriesDescription does not match /{pattern}/)"


@pytest.mark.parametrize(
    ("pattern", "nested"),
    [
        ("(a+)+$", True),
        (r"(\w+\s?)*$", True),
        ("((ab)*c)+", True),
        ("(x{2,})*y", True),
        ("(?:a*b)+", True),
        ("^(?!.*scout)", False),
        ("(CT|MR)+", False),
        (r"\(a+\)+", False),  # escaped parentheses are no group
        ("([a+]b)+", False),  # a + inside a character class is no quantifier
        ("chest|thorax", False),
        ("(ab)?c+", False),
    ],
)
def test_nested_quantifiers_are_spotted(pattern: str, nested: bool) -> None:
    assert nested_quantifier(pattern) is nested


def test_config_check_warns_about_nested_quantifiers_and_still_rejects_bad_patterns(tmp_path: Path) -> None:
    runner = CliRunner()
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"rules": [{"name": "ok", "match": {"series_description": "^(?!.*scout)"}},
                                                {"name": "risky", "match": {"study_description": "(a+)+$"}}]}))
    checked = runner.invoke(app, ["config", "check", "--config", str(config)])
    said = " ".join(checked.output.split())
    assert checked.exit_code == 0, checked.output
    assert "warning: rules[1] (risky).match.study_description: /(a+)+$/ repeats a group" in said
    assert "rules[0]" not in said
    config.write_text(yaml.safe_dump({"rules": [{"name": "bad", "match": {"series_description": "(a"}}]}))
    refused = runner.invoke(app, ["config", "check", "--config", str(config)])
    assert refused.exit_code == 2 and "not a valid regular expression" in refused.output


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_job_record_says_which_rule_timed_out(running_node: Callable[..., Node], tmp_path: Path) -> None:
    node = running_node(rules=[{"name": "slow", "match": {"series_description": SLOW}}])
    (path,) = make_study(tmp_path / "s", 1)
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = CRAFTED
    ds.save_as(path, enforce_file_format=True)
    assert storescu(node, [path]).returncode == 0
    jobs = wait_for(lambda: node.store.list_jobs(), timeout=60)
    assert isinstance(jobs, list) and len(jobs) == 1
    assert jobs[0].state is JobState.SKIPPED
    assert jobs[0].error is not None and "slow: SeriesDescription pattern /(a|a)+$/ timed out" in jobs[0].error
