"""The administrator's commands on a real job store: config check, jobs list/show/retry/cancel."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.jobs.schema import JobState
from dicom_node.node import Node
from tests.conftest import free_port, make_study
from tests.dicom_node.test_intake import storescu, wait_for

runner = CliRunner()


def test_config_check_names_key_value_and_rule(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"node": {"port": 70000}, "queue": {"broker": "x"}}))
    result = runner.invoke(app, ["config", "check", "--config", str(bad)])
    assert result.exit_code == 2
    assert "node.port" in result.output and "70000" in result.output
    assert "queue.broker: unknown key" in result.output
    good = runner.invoke(app, ["config", "check", "--config", "config/node.example.yaml"])
    assert good.exit_code == 0, good.output


def test_store_url_errors_name_the_url_without_its_password(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": "mysql://node:s3cret@db.example/jobs"}}))
    refused = runner.invoke(app, ["config", "check", "--config", str(config)])
    said = " ".join(refused.output.split())  # the console wraps long lines
    assert refused.exit_code == 2
    assert "store.url: the job store runs on sqlite or postgresql" in said
    assert "node:***@db.example" in said and "s3cret" not in said

    config.write_text(yaml.safe_dump({"store": {"url": f"postgresql://node:s3cret@127.0.0.1:{free_port()}/jobs"}}))
    checked = runner.invoke(app, ["config", "check", "--config", str(config)])
    assert checked.exit_code == 0 and "job store postgresql+psycopg://node:***@127.0.0.1:" in checked.output
    assert "s3cret" not in checked.output
    down = runner.invoke(app, ["jobs", "list", "--config", str(config)])
    said = " ".join(down.output.split())
    assert down.exit_code == 1 and "cannot be opened" in said and "s3cret" not in said


def test_a_bad_value_from_the_environment_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE__NODE__PORT", "70000")
    refused = runner.invoke(app, ["config", "check"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "node.port:" in said and "'70000', from DICOM_NODE__NODE__PORT)" in said


def test_jobs_list_show_cancel_retry(
    running_node: Callable[..., Node], tmp_path: Path, store_section: dict[str, Any]
) -> None:
    node = running_node(**store_section)
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(node.settings.node.data_dir)}, **store_section}))
    assert storescu(node, make_study(tmp_path / "s", 1)).returncode == 0
    job_id = wait_for(lambda: node.store.list_jobs())[0].id  # type: ignore[index]

    listed = runner.invoke(app, ["jobs", "list", "--json", "--config", str(config)])
    assert listed.exit_code == 0 and json.loads(listed.output)[0]["state"] == "queued"
    refused = runner.invoke(app, ["jobs", "retry", str(job_id), "--config", str(config)])
    assert refused.exit_code == 1 and "cannot retry job" in refused.output
    assert runner.invoke(app, ["jobs", "cancel", str(job_id), "--config", str(config)]).exit_code == 0
    assert node.store.job(job_id).state is JobState.CANCELLED  # type: ignore[union-attr]
    again = runner.invoke(app, ["jobs", "cancel", str(job_id), "--config", str(config)])
    assert again.exit_code == 1 and "it is cancelled" in again.output
    assert runner.invoke(app, ["jobs", "retry", str(job_id), "--config", str(config)]).exit_code == 0
    assert node.store.job(job_id).state is JobState.QUEUED  # type: ignore[union-attr]
    shown = runner.invoke(app, ["jobs", "show", str(job_id), "--config", str(config)])
    assert "retried by administrator" in shown.output and "cancelled by administrator" in shown.output
    missing = runner.invoke(app, ["jobs", "show", "9999", "--config", str(config)])
    assert missing.exit_code == 1


@pytest.mark.parametrize("example", sorted(Path("config").glob("*.example.yaml")), ids=lambda p: p.name)
def test_every_example_configuration_is_valid(example: Path) -> None:
    checked = runner.invoke(app, ["config", "check", "--config", str(example)])
    assert checked.exit_code == 0, checked.output
    assert "warning" not in checked.output, checked.output


def test_config_check_warns_of_unverified_tls_and_plain_http_credentials_and_show_hides_secrets(
    tmp_path: Path,
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"destinations": [
        {"name": "lab", "kind": "dicomweb", "url": "https://lab/dicom-web", "tls_verify": False},
        {"name": "old", "kind": "dicomweb", "url": "http://old/dicom-web", "auth": "basic", "username": "u",
         "password": "pw-in-file-42"},
    ]}))  # fmt: skip
    checked = runner.invoke(app, ["config", "check", "--config", str(config)])
    said = " ".join(checked.output.split())
    assert checked.exit_code == 0, checked.output
    assert "warning: destination 'lab': tls_verify is false: the server's certificate is not checked" in said
    assert "warning: destination 'old': basic credentials go over plain http to http://old/dicom-web" in said
    shown = runner.invoke(app, ["config", "show", "--config", str(config)])
    assert shown.exit_code == 0 and "pw-in-file-42" not in shown.output and '"**********"' in shown.output
