"""STOW-RS towards a real HTTP server on loopback that answers as each test wants (tests/dicom_node/stow_server.py):
requests, per-object outcomes of partial answers, HTTP errors, credentials, TLS, and the export step's retry."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from pydantic import SecretStr

from dicom_node.config import DicomWebDestinationSettings
from dicom_node.devtools.receiver import free_port
from dicom_node.export.outcome import AssociationState, FileResult, Outcome
from dicom_node.export.stow import echo, send_files
from dicom_node.jobs.schema import JobState
from dicom_node.status import Status
from dicom_node.work.steps import TransientError, WorkerContext, run_export
from tests.conftest import make_study
from tests.dicom_node.export_job import export_job
from tests.dicom_node.stow_server import Answer, StowServer, stow_response

pytestmark = pytest.mark.integration


def _files(tmp_path: Path, count: int) -> tuple[list[Path], list[str]]:
    files = make_study(tmp_path / "results", count)
    return files, [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def _destination(server: StowServer, **settings: object) -> DicomWebDestinationSettings:
    return DicomWebDestinationSettings.model_validate(server.destination(**settings))


def test_objects_go_in_requests_of_the_configured_size_and_each_is_recorded_as_its_answer_arrives(
    tmp_path: Path,
) -> None:
    files, uids = _files(tmp_path, 5)
    acknowledged: list[str] = []
    with StowServer() as server:
        report = send_files(
            _destination(server, objects_per_request=2), files,
            on_delivered=lambda r: acknowledged.append(str(r.sop_instance_uid)),
        )  # fmt: skip
        assert [r.uids for r in server.requests] == [uids[0:2], uids[2:4], uids[4:5]]
        assert all(r.path == "/dicom-web/studies" for r in server.requests)
    assert report.outcome is Outcome.DELIVERED, report.reason
    assert acknowledged == uids
    assert [a.state for a in report.associations] == [AssociationState.ANSWERED] * 3


def test_a_partial_answer_gives_each_object_its_own_outcome(tmp_path: Path) -> None:
    """202 Accepted: one stored, one stored with a warning, one out of resources (retry), one refused (never), one
    the server did not mention (sent again)."""
    files, uids = _files(tmp_path, 5)
    stored, warned, busy, refused, _unmentioned = uids

    def respond(got: list[str]) -> Answer:
        body = stow_response(
            stored=[stored, warned],
            warnings={warned: Status.COERCION_OF_DATA_ELEMENTS},
            failed={busy: Status.OUT_OF_RESOURCES, refused: Status.SOP_CLASS_NOT_SUPPORTED},
        )
        return Answer(202, body)

    acknowledged: list[FileResult] = []
    with StowServer(respond) as server:
        report = send_files(_destination(server), files, on_delivered=acknowledged.append)
    by_uid = {f.sop_instance_uid: f for f in report.files}
    assert [f.outcome for f in report.files] == [
        Outcome.DELIVERED, Outcome.DELIVERED, Outcome.TRANSIENT, Outcome.REJECTED, Outcome.TRANSIENT,
    ]  # fmt: skip
    assert [r.sop_instance_uid for r in acknowledged] == [stored, warned]
    assert "warning 0xB000 (Coercion of Data Elements)" in by_uid[warned].reason
    assert by_uid[busy].status == Status.OUT_OF_RESOURCES and "temporarily unable" in by_uid[busy].reason
    assert "0x0122 (Refused: SOP Class Not Supported)" in by_uid[refused].reason
    assert report.outcome is Outcome.REJECTED  # one object can never be stored: the job fails with its reason
    assert "0x0122" in report.reason


def test_409_conflict_stores_none_and_says_why_per_object(tmp_path: Path) -> None:
    files, uids = _files(tmp_path, 2)
    with StowServer(lambda got: Answer(409, stow_response(failed={uids[0]: 0xC000}))) as server:
        report = send_files(_destination(server), files)
    assert [f.outcome for f in report.files] == [Outcome.REJECTED, Outcome.REJECTED]
    assert "0xC000 (Cannot Understand)" in report.files[0].reason
    assert "409 Conflict" in report.files[1].reason


@pytest.mark.parametrize(
    ("status", "outcome", "words"),
    [
        (400, Outcome.REJECTED, "400 Bad Request from http://127.0.0.1:"),
        (403, Outcome.REJECTED, "403 Forbidden from http://127.0.0.1:"),
        (404, Outcome.REJECTED, "url must be the DICOMweb base"),
        (413, Outcome.REJECTED, "over the server's upload limit (lower objects_per_request"),
        (415, Outcome.REJECTED, "415 Unsupported Media Type"),
        (408, Outcome.TRANSIENT, "408 Request Timeout"),
        (429, Outcome.TRANSIENT, "429 Too Many Requests"),
        (500, Outcome.TRANSIENT, "500 Internal Server Error"),
        (502, Outcome.TRANSIENT, "502 Bad Gateway"),
        (503, Outcome.TRANSIENT, "503 Service Unavailable"),
    ],
)
def test_an_http_error_decides_for_the_request_and_stops_the_send(
    tmp_path: Path, status: int, outcome: Outcome, words: str
) -> None:
    files, _uids = _files(tmp_path, 3)
    with StowServer(lambda got: Answer(status, "the server's own words", "text/plain")) as server:
        report = send_files(_destination(server, objects_per_request=1), files)
        assert len(server.requests) == 1, "after a failed request the next ones are not tried"
    assert report.outcome is outcome
    assert all(f.outcome is outcome for f in report.files)
    assert words in report.reason, report.reason


def test_wrong_credentials_are_permanent_with_a_readable_reason_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, _uids = _files(tmp_path, 2)
    caplog.set_level(logging.DEBUG)
    with StowServer(credentials=("basic", "node:right-password")) as server:
        wrong = _destination(server, auth="basic", username="node", password="wrong-password")
        report = send_files(wrong, files)
        right = send_files(_destination(server, auth="basic", username="node", password="right-password"), files)
    assert report.outcome is Outcome.REJECTED
    assert report.reason == f"401 Unauthorized from {server.url}: check the credentials (auth: basic, username 'node')"
    assert right.outcome is Outcome.DELIVERED
    shown = caplog.text + str(report.as_dict()) + repr(wrong) + wrong.model_dump_json()
    assert "wrong-password" not in shown and "right-password" not in shown


def test_a_bearer_token_goes_in_the_authorization_header_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, _uids = _files(tmp_path, 1)
    caplog.set_level(logging.DEBUG)
    with StowServer(credentials=("bearer", "t0ken-value")) as server:
        report = send_files(_destination(server, auth="bearer", token="t0ken-value"), files)
        none = send_files(_destination(server), files)
        assert server.requests[0].authorization == "Bearer t0ken-value"
    assert report.outcome is Outcome.DELIVERED, report.reason
    assert none.outcome is Outcome.REJECTED and "the server wants credentials: set auth" in none.reason
    assert "t0ken-value" not in caplog.text


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (Answer(200, "<html><body>Please log in</body></html>", "text/html"), "HTTP 200 with text/html, not a"),
        (Answer(200, "{'DOE^JOHN'", "application/dicom+json"), "a body that claims DICOM JSON and is not"),
    ],
)
def test_an_answer_that_is_not_stow_rs_is_refused_without_quoting_it(
    tmp_path: Path, answer: Answer, words: str
) -> None:
    files, _uids = _files(tmp_path, 1)
    with StowServer(lambda got: answer) as server:
        report = send_files(_destination(server), files)
    assert report.outcome is Outcome.REJECTED
    assert words in report.reason
    assert "DOE" not in report.reason and "log in" not in report.reason


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_that_drops_the_objects_is_refused_with_where_it_points(tmp_path: Path, status: int) -> None:
    """A POST answered with 301/302/303 is followed as a GET without the objects (an http:// URL of an https://
    archive, say): nothing was stored, and retrying would not change that."""
    files, _uids = _files(tmp_path, 1)
    with StowServer() as target:
        moved = Answer(status, None, headers={"Location": f"{target.url}/studies"})
        with StowServer(lambda got: moved) as server:
            report = send_files(_destination(server), files)
        assert not target.received
    assert report.outcome is Outcome.REJECTED
    assert f"redirects STOW-RS to {target.url}/studies (HTTP {status})" in report.reason
    assert "set url to the address it names" in report.reason


def test_no_server_and_no_answer_are_transient(tmp_path: Path) -> None:
    files, _uids = _files(tmp_path, 2)
    down = DicomWebDestinationSettings(
        name="vna", kind="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5
    )
    report = send_files(down, files)
    assert report.outcome is Outcome.TRANSIENT
    assert report.association is not None and report.association.state is AssociationState.REFUSED
    assert "connection refused by http://127.0.0.1:" in report.reason

    with StowServer(lambda got: Answer(200, stow_response(got), delay=3)) as server:
        slow = send_files(_destination(server, timeout=1), files)
    assert slow.outcome is Outcome.TRANSIENT
    assert slow.reason == f"no answer from {server.url} within 1 s"


def test_tls_is_verified_by_default_and_unverified_only_when_asked_with_a_warning(
    tmp_path: Path, pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, _uids = _files(tmp_path, 1)
    with StowServer(tls=(pki / "pacs.pem", pki / "pacs.key")) as server:
        assert server.url.startswith("https://")
        untrusted = send_files(_destination(server), files)
        assert untrusted.outcome is Outcome.REJECTED
        assert untrusted.association is not None and untrusted.association.state is AssociationState.TLS_FAILED
        assert "certificate verify failed" in untrusted.reason and "set tls_ca_file" in untrusted.reason

        other = send_files(_destination(server, tls_ca_file=str(pki / "other-ca.pem")), files)
        assert other.outcome is Outcome.REJECTED and "certificate verify failed" in other.reason

        trusted = send_files(_destination(server, tls_ca_file=str(pki / "ca.pem")), files)
        assert trusted.outcome is Outcome.DELIVERED, trusted.reason

        caplog.set_level(logging.WARNING)
        unverified = send_files(_destination(server, tls_verify=False), files)
        assert unverified.outcome is Outcome.DELIVERED, unverified.reason
        assert "tls_verify is false: the server's certificate is not checked" in caplog.text

        missing = send_files(_destination(server, tls_ca_file=str(tmp_path / "nowhere.pem")), files)
        assert missing.outcome is Outcome.REJECTED and "TLS files of destination 'vna' are unusable" in missing.reason


def test_echo_is_a_qido_rs_search(tmp_path: Path) -> None:
    with StowServer(credentials=("basic", "node:pw")) as server:
        ok = echo(_destination(server, auth="basic", username="node", password="pw"))
        refused = echo(_destination(server, auth="basic", username="node", password="nope"))
        assert server.requests[0].path.startswith("/dicom-web/studies?")
    assert ok.ok and str(ok).startswith(f"vna ({server.url}): QIDO-RS ok, round trip ")
    assert not refused.ok and "401 Unauthorized" in refused.reason and "check the credentials" in str(refused)
    down = echo(DicomWebDestinationSettings(name="vna", kind="dicomweb", url=f"http://127.0.0.1:{free_port()}"))
    assert not down.ok and down.state is AssociationState.REFUSED


def test_the_export_retry_sends_only_what_the_archive_did_not_store(tmp_path: Path) -> None:
    """The export step with a DICOMweb destination: a 202 that leaves one object out of resources is a retry of
    that object alone; the objects stored are on record as soon as the answer arrived."""
    answers = iter(["partial", "all"])

    def respond(got: list[str]) -> Answer:
        if next(answers) == "partial":
            return Answer(202, stow_response(stored=got[1:], failed={got[0]: Status.OUT_OF_RESOURCES}))
        return Answer(200, stow_response(stored=got))

    with StowServer(respond) as server:
        job = export_job(tmp_path, server.destination(), 4)
        ctx = WorkerContext(job.settings)
        try:
            with pytest.raises(TransientError, match=r"vna: .*temporarily unable to store it: 0xA700"):
                run_export(ctx, job.job_id)
            recorded = {r["sop_instance_uid"]: r["delivered_to"] for r in ctx.store.job_results(job.job_id)}
            assert recorded == {uid: ([] if uid == job.uids[0] else ["vna"]) for uid in job.uids}

            run_export(ctx, job.job_id)
            assert [r.uids for r in server.requests] == [job.uids, [job.uids[0]]]
            assert server.received == {uid: 1 for uid in job.uids}
            done = ctx.store.job(job.job_id)
            assert done is not None and done.state is JobState.DELIVERED
        finally:
            ctx.store.close()


def test_a_secret_is_never_shown_in_a_configuration_error() -> None:
    from dicom_node.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as raised:
        load_settings(None, {"destinations": [
            {"name": "vna", "kind": "dicomweb", "url": "https://u:pw-in-url@vna/dicom-web", "auth": "basic",
             "username": "u", "password": 991234},
        ]})  # fmt: skip
    said = str(raised.value)
    assert "destinations.0.url: must not hold credentials: use auth: basic" in said
    assert "destinations.0.password: Input should be a valid string (got '***')" in said
    assert "991234" not in said and "pw-in-url" not in said
    settings = load_settings(None, {"destinations": [
        {"name": "vna", "kind": "dicomweb", "url": "https://vna/dicom-web", "auth": "bearer", "token": "tkn-123"},
    ]})  # fmt: skip
    destination = settings.destinations[0]
    assert isinstance(destination, DicomWebDestinationSettings) and destination.token == SecretStr("tkn-123")
    assert "tkn-123" not in settings.model_dump_json()


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"url": "ftp://vna/dicom-web"}, "url: must be an http:// or https:// URL with a host"),
        ({"url": "https://vna/dicom-web?x=1"}, "url: must be the DICOMweb base URL, without query or fragment"),
        ({"url": "http://[::1]:8042/dicom-web"}, "url: cannot name an IPv6 address in brackets"),
        ({"auth": "basic", "username": "u"}, "auth: basic needs username and password"),
        ({"auth": "bearer"}, "auth: bearer needs token"),
        ({"password": "pw"}, "password given but auth is 'none'; set auth or remove them"),
        ({"tls_verify": False, "tls_ca_file": "/etc/ca.pem"}, "tls_ca_file verifies the server, but tls_verify is"),
        ({"url": "http://vna/dicom-web", "tls_ca_file": "/etc/ca.pem"}, "tls_ca_file apply to https:// URLs only"),
        ({"tls_cert_file": "/etc/node.pem"}, "tls_cert_file and tls_key_file go together"),
        ({"objects_per_request": 0}, "objects_per_request: Input should be greater than or equal to 1"),
    ],
)
def test_a_dicomweb_destination_that_cannot_work_is_refused_at_load(settings: dict[str, object], words: str) -> None:
    from dicom_node.config import ConfigError, load_settings

    entry = {"name": "vna", "kind": "dicomweb", "url": "https://vna/dicom-web", **settings}
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {"destinations": [entry]})
    assert words in str(raised.value)
