"""The console over real HTTP: a node that received a real study over C-STORE, its console on loopback, users made
with the `dicom-node users` command. Log-in, roles, CSRF, lock-out, API tokens, no patient data to anonymous
requests, readiness against a PostgreSQL job store that stops and returns, and webhooks to a real HTTP receiver."""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from typer.testing import CliRunner

from dicom_node.cli import app as cli
from dicom_node.config import Settings
from dicom_node.console.webhooks import Notifier
from dicom_node.devtools.receiver import free_port
from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from dicom_node.node import Node
from dicom_node.work.heartbeat import Heartbeat
from tests.conftest import RecordingDispatcher, make_study
from tests.dicom_node.test_intake import storescu, wait_for
from tests.postgres import PostgresServer, postgres_bin

pytestmark = pytest.mark.integration

PATIENT = "CONSOLE^PATIENT^LEAKCHECK"
PASSWORD = "correct horse battery"


def users_cmd(node: Node, tmp_path: Path, *args: str, password: str | None = None) -> str:
    """Run `dicom-node users ...` against the node's job store (a config file naming its data_dir/store)."""
    config = tmp_path / "users.yaml"
    data: dict[str, Any] = {"node": {"data_dir": str(node.settings.node.data_dir)}}
    if node.settings.store.url is not None:
        data["store"] = {"url": node.settings.store.url.get_secret_value()}
    config.write_text(json.dumps(data))
    extra = ["--password-stdin"] if password is not None else []
    result = CliRunner().invoke(cli, ["users", *args, *extra, "--config", str(config)], input=(password or "") + "\n")
    assert result.exit_code == 0, result.output
    return str(result.output)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def login(base: str, name: str, password: str = PASSWORD) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=20)
    form = client.get("/login")
    answer = client.post("/login", data={"username": name, "password": password, "csrf": csrf_of(form.text)})
    return client, answer


@pytest.fixture
def console_node(running_node: Callable[..., Node], tmp_path: Path) -> Node:
    """A node with its console on, that received one study of a named patient; users admin and viewer."""
    node = running_node(node={"http_port": free_port()})
    files = make_study(tmp_path / "s", 1, template="RG1_UNCI.dcm")
    ds = pydicom.dcmread(files[0])
    ds.PatientName = PATIENT
    ds.AccessionNumber = "ACC-CONSOLE-1"
    ds.save_as(files[0], enforce_file_format=True)
    assert storescu(node, files).returncode == 0
    wait_for(lambda: node.store.list_jobs())
    users_cmd(node, tmp_path, "add", "admin", "--role", "admin", password=PASSWORD)
    users_cmd(node, tmp_path, "add", "viewer", "--role", "viewer", password=PASSWORD)
    return node


def test_anonymous_requests_go_to_log_in_and_never_see_a_patient(
    console_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    assert console_node.console is not None
    caplog.set_level(logging.INFO, logger="dicom_node.audit")
    base = console_node.console.url
    job = console_node.store.list_jobs()[0]
    anonymous = httpx.Client(base_url=base, follow_redirects=False, timeout=20)
    image = console_node.store.study_instances(job.study_uid)[0].sop_instance_uid
    pages = ["/", "/jobs", f"/jobs/{job.id}", f"/jobs/{job.id}/preview/{image}.png", "/destinations", "/rules",
             f"/rules?study={job.study_uid}", "/config", "/audit", "/notifications"]
    for path in pages:
        answer = anonymous.get(path)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next="), path
        assert PATIENT.split("^")[0] not in answer.text
    for path in ["/api/overview", "/api/jobs", f"/api/jobs/{job.id}", "/api/config", "/api/audit", "/api/me",
                 f"/api/rules/test?study={job.study_uid}"]:
        answer = anonymous.get(path)
        assert answer.status_code == 401, path
        assert PATIENT.split("^")[0] not in answer.text
    for path in ["/healthz", "/readyz", "/login", "/docs", "/openapi.json"]:
        answer = anonymous.get(path)
        assert answer.status_code in (200, 503), path
        assert PATIENT.split("^")[0] not in answer.text
    assert anonymous.post(f"/api/jobs/{job.id}/retry").status_code in (401, 403)
    # Logged in, the same page shows the patient: the checks above could fail.
    viewer, answer = login(base, "viewer")
    assert answer.status_code == 303
    detail = viewer.get(f"/jobs/{job.id}")
    assert detail.status_code == 200 and PATIENT in detail.text and "ACC-CONSOLE-1" in detail.text
    png = viewer.get(f"/jobs/{job.id}/preview/{image}.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    audited = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dicom_node.audit"]
    views = [a for a in audited if a.get("action") == "view_job"]
    assert views and views[-1]["user"] == "viewer" and views[-1]["job"] == job.id
    assert viewer.get("/jobs", params={"accession": "ACC-CONSOLE-1"}).text.count(f'data-job="{job.id}"') == 1
    assert viewer.get("/jobs", params={"accession": "OTHER"}).text.count("data-job=") == 0


def test_a_viewer_cannot_retry_an_admin_can_and_forms_need_the_csrf_token(console_node: Node) -> None:
    assert console_node.console is not None
    base = console_node.console.url
    job = console_node.store.list_jobs()[0]
    assert console_node.store.transition(job.id, JobState.FAILED, error="test: destination refused")
    viewer, _ = login(base, "viewer")
    page = viewer.get(f"/jobs/{job.id}")
    assert 'id="retry"' not in page.text  # no button for a viewer
    refused = viewer.post(f"/jobs/{job.id}/retry", data={"csrf": csrf_of(page.text)})
    assert refused.status_code == 403
    assert console_node.store.job(job.id).state is JobState.FAILED  # type: ignore[union-attr]

    admin, _ = login(base, "admin")
    page = admin.get(f"/jobs/{job.id}")
    assert 'id="retry"' in page.text and "test: destination refused" in page.text
    assert admin.post(f"/jobs/{job.id}/retry").status_code == 403  # no token
    assert admin.post(f"/jobs/{job.id}/retry", data={"csrf": "forged" + csrf_of(page.text)}).status_code == 403
    assert viewer.post(f"/jobs/{job.id}/retry", data={"csrf": csrf_of(page.text)}).status_code == 403  # not theirs
    assert console_node.store.job(job.id).state is JobState.FAILED  # type: ignore[union-attr]
    done = admin.post(f"/jobs/{job.id}/retry", data={"csrf": csrf_of(page.text)})
    assert done.status_code == 303
    after = console_node.store.job(job.id)
    assert after is not None and after.state is JobState.QUEUED
    events = console_node.store.job_events(job.id)
    assert events[-1]["detail"] == "retried by console user admin"
    # The same rule through the API with the session cookie: the token goes in X-CSRF-Token.
    assert admin.post(f"/api/jobs/{job.id}/cancel").status_code == 403
    ok = admin.post(f"/api/jobs/{job.id}/cancel", headers={"X-CSRF-Token": csrf_of(page.text)})
    assert ok.status_code == 200 and console_node.store.job(job.id).state is JobState.CANCELLED  # type: ignore


def test_five_wrong_passwords_lock_the_account_until_passwd(console_node: Node, tmp_path: Path) -> None:
    assert console_node.console is not None
    base = console_node.console.url
    for _ in range(4):
        _, answer = login(base, "viewer", "wrong password")
        assert answer.status_code == 401 and "wrong name or password" in answer.text
    _, answer = login(base, "viewer", "wrong password")
    assert answer.status_code == 401 and "locked" in answer.text
    _, answer = login(base, "viewer")  # the right password no longer opens it
    assert answer.status_code == 401 and "locked" in answer.text
    users_cmd(console_node, tmp_path, "passwd", "viewer", password=PASSWORD)
    _, answer = login(base, "viewer")
    assert answer.status_code == 303
    # After log-in the browser goes back where it was sent from, but never to another site.
    for asked, lands in (("/jobs?state=failed", "/jobs?state=failed"), ("//evil.example", "/"), ("/\\evil", "/")):
        client = httpx.Client(base_url=base, follow_redirects=False, timeout=20)
        form = client.get("/login")
        answer = client.post(
            "/login", data={"username": "viewer", "password": PASSWORD, "csrf": csrf_of(form.text), "next": asked}
        )
        assert answer.headers["location"] == lands, asked


def test_api_tokens_per_user_and_openapi(console_node: Node, tmp_path: Path) -> None:
    assert console_node.console is not None
    base = console_node.console.url
    job = console_node.store.list_jobs()[0]
    token = users_cmd(console_node, tmp_path, "token", "viewer").strip()
    assert token.startswith("dn_")
    api = httpx.Client(base_url=base, timeout=20, headers={"Authorization": f"Bearer {token}"})
    assert api.get("/api/me").json() == {"name": "viewer", "role": "viewer"}
    listed = api.get("/api/jobs").json()
    assert [j["id"] for j in listed["jobs"]] == [job.id]
    detail = api.get(f"/api/jobs/{job.id}").json()
    assert detail["patient"]["name"] == PATIENT and detail["instances"] == 1
    assert api.post(f"/api/jobs/{job.id}/cancel").status_code == 403  # a viewer's token cannot act
    bad = httpx.get(f"{base}/api/jobs", headers={"Authorization": "Bearer dn_forged"}, timeout=20)
    assert bad.status_code == 401 and PATIENT not in bad.text
    admin_token = users_cmd(console_node, tmp_path, "token", "admin").strip()
    acted = httpx.post(f"{base}/api/jobs/{job.id}/cancel", headers={"Authorization": f"Bearer {admin_token}"})
    assert acted.status_code == 200, acted.text
    spec = httpx.get(f"{base}/openapi.json").json()
    assert "/api/jobs" in spec["paths"] and "/readyz" in spec["paths"]
    config = api.get("/api/config").json()
    assert config["console"]["secret_key"] is None and "webhooks" in config["notifications"]


def test_readyz_follows_a_postgresql_job_store_that_stops_and_returns(
    running_node: Callable[..., Node],
) -> None:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    server = PostgresServer(bindir).start()
    beat: Heartbeat | None = None
    try:
        node = running_node(
            store={"url": server.new_database()}, node={"http_port": free_port()},
            queue={"worker_heartbeat_seconds": 0.5, "start_workers": False},
        )
        assert node.console is not None
        url = f"{node.console.url}/readyz"
        unready = httpx.get(url, timeout=20)
        assert unready.status_code == 503  # no worker yet
        assert unready.json()["checks"]["inference_workers"]["ok"] is False
        # The heartbeat an inference worker writes (dicom_node.work.heartbeat), here without loading a model.
        beat = Heartbeat(lambda: node.store, "inference-test@host", ["inference"], "cpu", "demo", period=0.5).start()
        ready = wait_for(lambda: httpx.get(url, timeout=20).status_code == 200, timeout=10)
        assert ready
        server.stop_server()
        down = httpx.get(url, timeout=30)
        assert down.status_code == 503
        assert down.json()["checks"]["job_store"]["ok"] is False
        assert "unreachable" in down.json()["checks"]["job_store"]["detail"]
        assert httpx.get(f"{node.console.url}/healthz", timeout=20).status_code == 200  # alive all the same
        server.start_server()
        assert wait_for(lambda: httpx.get(url, timeout=30).status_code == 200, timeout=30)
    finally:
        if beat is not None:
            beat.stop()
        server.stop()


class HookReceiver:
    """A real HTTP server on loopback that records every JSON body POSTed to it; can be down for a while."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bodies: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> HookReceiver:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def hook() -> Iterator[HookReceiver]:
    receiver = HookReceiver().start()
    yield receiver
    receiver.stop()


def test_webhooks_one_per_job_event_and_again_after_an_outage(
    running_node: Callable[..., Node], make_settings: Callable[..., Settings], hook: HookReceiver, tmp_path: Path
) -> None:
    node = running_node(
        node={"http_port": free_port()},
        notifications={
            "webhooks": [{"name": "ops", "url": hook.url, "events": ["job_failed", "results_delivered"]}],
            "retry": {"base_seconds": 0.2, "cap_seconds": 1, "max_retries": 50},
        },
    )
    ids = []
    for n in range(3):
        assert storescu(node, make_study(tmp_path / f"s{n}", 1)).returncode == 0
    wait_for(lambda: len(node.store.list_jobs()) == 3, timeout=30)
    ids = sorted(j.id for j in node.store.list_jobs())
    # What the export and inference steps record when a job ends (dicom_node.work.steps).
    node.store.transition(ids[0], JobState.DELIVERED, detail="2 object(s) to pacs")
    node.store.transition(ids[1], JobState.FAILED, error="pacs: association rejected")
    assert wait_for(lambda: len(hook.bodies) == 2, timeout=15)
    time.sleep(1.5)  # nothing more arrives
    assert sorted((b["event"], b["job"]["id"]) for b in hook.bodies) == [
        ("job_failed", ids[1]), ("results_delivered", ids[0])
    ]
    failed = next(b for b in hook.bodies if b["event"] == "job_failed")
    assert failed["job"]["error"] == "pacs: association rejected" and failed["node"] == "AINODE"
    assert failed["console_url"].endswith(f"/jobs/{ids[1]}")
    assert not any("study_uid" in json.dumps(b) for b in hook.bodies)  # the study only as a hash

    hook.stop()  # the receiver is down for a while: the notification waits and is tried again
    node.store.transition(ids[2], JobState.DELIVERED, detail="2 object(s) to pacs")
    time.sleep(2.5)
    assert len(hook.bodies) == 2
    assert Notifier.waiting(node.store) == {"ops": 1}  # what the console's Waiting column shows
    hook.start()
    assert wait_for(lambda: len(hook.bodies) == 3, timeout=15)
    assert hook.bodies[-1]["event"] == "results_delivered" and hook.bodies[-1]["job"]["id"] == ids[2]
    time.sleep(1.5)
    assert len(hook.bodies) == 3  # once, not once per attempt

    # The console's "send a test" button, by an admin.
    users_cmd(node, tmp_path, "add", "admin", "--role", "admin", password=PASSWORD)
    assert node.console is not None
    admin, _ = login(node.console.url, "admin")
    page = admin.get("/notifications")
    assert re.search(r'<td class="waiting">0</td>', page.text), page.text  # nothing left waiting
    tested = admin.post("/notifications/ops/test", data={"csrf": csrf_of(page.text)})
    assert tested.status_code == 200 and "ops: delivered" in tested.text
    assert hook.bodies[-1]["event"] == "test"


def test_webhooks_survive_a_restart_of_the_node_and_announce_what_finished_meanwhile(
    make_settings: Callable[..., Settings], hook: HookReceiver, tmp_path: Path
) -> None:
    """A notification that could not be sent when the node stopped, and a job the workers finished while it was
    down, are both sent by the next start of the node, each once."""
    settings = make_settings(notifications={
        "webhooks": [{"name": "ops", "url": hook.url, "events": ["job_failed", "results_delivered"]}],
        "retry": {"base_seconds": 0.2, "cap_seconds": 1, "max_retries": 50},
    })
    node = Node(settings, dispatcher=RecordingDispatcher())
    node.start()
    try:
        for n in range(2):
            assert storescu(node, make_study(tmp_path / f"s{n}", 1)).returncode == 0
        wait_for(lambda: len(node.store.list_jobs()) == 2, timeout=30)
        first, second = sorted(j.id for j in node.store.list_jobs())
        hook.stop()  # the endpoint is down
        node.store.transition(first, JobState.DELIVERED, detail="2 object(s) to pacs")
        assert node.notifier is not None
        assert wait_for(lambda: node.notifier is not None and node.notifier.pending() == 1, timeout=15)
    finally:
        node.stop()
    # `dicom-node status` tells the administrator what waits.
    config = tmp_path / "status.yaml"
    config.write_text(json.dumps({"node": {"data_dir": str(settings.node.data_dir)},
                                  "notifications": {"webhooks": [{"name": "ops", "url": hook.url}]}}))
    status = CliRunner().invoke(cli, ["status", "--config", str(config)])
    assert status.exit_code == 0 and "webhook notifications waiting: ops 1" in status.output, status.output
    # While the node is down, a worker fails the other job (workers write the same job store).
    store = JobStore(settings.store_url)
    store.transition(second, JobState.FAILED, error="pacs: association rejected")
    store.close()
    hook.start()
    again = Node(settings, dispatcher=RecordingDispatcher())
    again.start()
    try:
        assert wait_for(lambda: len(hook.bodies) == 2, timeout=20), hook.bodies
        time.sleep(1.5)  # nothing more arrives
        assert sorted((b["event"], b["job"]["id"]) for b in hook.bodies) == [
            ("job_failed", second), ("results_delivered", first)
        ]
        assert again.notifier is not None and again.notifier.pending() == 0
    finally:
        again.stop()


def test_console_over_tls_with_the_dicom_certificate_sets_secure_cookies(
    running_node: Callable[..., Node], pki: Path
) -> None:
    node = running_node(node={
        "http_port": free_port(), "http_tls": True,
        "tls_cert_file": str(pki / "node.pem"), "tls_key_file": str(pki / "node.key"),
    })
    assert node.console is not None and node.console.url.startswith("https://")
    trust = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    client = httpx.Client(base_url=node.console.url, verify=trust, timeout=20)
    assert client.get("/healthz").json() == {"status": "ok"}
    cookie = client.get("/login").headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the same port gets no answer
        httpx.get(node.console.url.replace("https://", "http://") + "/healthz", timeout=5)
