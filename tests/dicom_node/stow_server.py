"""A DICOMweb archive that answers as a test wants: a real HTTP server on loopback (plain or TLS) that reads each
STOW-RS request (multipart/related, chunked or not), keeps what arrived, checks credentials, and answers with a
status and a Store Instances Response chosen per request. The DICOMweb counterpart of ``StoreRecorder``."""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

__all__ = ["Answer", "StowServer", "stow_response"]


@dataclass
class Answer:
    """What the server answers one request with: an HTTP status, and a JSON body (a dict) or raw text."""

    status: int = 200
    body: dict[str, Any] | str | None = None
    content_type: str = "application/dicom+json"
    delay: float = 0.0  # seconds before answering (a slow server)
    headers: dict[str, str] = field(default_factory=dict)  # more headers (Location of a redirect)


def stow_response(
    stored: Sequence[str] = (), failed: dict[str, int] | None = None, warnings: dict[str, int] | None = None
) -> dict[str, Any]:
    """A Store Instances Response Module (PS3.18 10.5.3) as DICOM JSON: ``stored`` SOP Instance UIDs in the
    Referenced SOP Sequence (``warnings``: with a Warning Reason), ``failed`` UIDs with their Failure Reason."""
    ds = Dataset()
    ds.ReferencedSOPSequence = []
    for uid in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = uid
        if warnings and uid in warnings:
            item.WarningReason = warnings[uid]
        ds.ReferencedSOPSequence.append(item)
    if failed:
        ds.FailedSOPSequence = []
        for uid, reason in failed.items():
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    answer: dict[str, Any] = ds.to_json_dict()
    return answer


@dataclass
class Request:
    path: str
    authorization: str | None
    uids: list[str] = field(default_factory=list)


class StowServer:
    """``respond(uids)`` chooses the :class:`Answer` to a STOW-RS request holding ``uids`` (default: 200, all stored).
    ``credentials``: ``("basic", "user:password")`` or ``("bearer", "token")``; a request without them gets 401.
    ``tls``: (certificate, key) PEM files: the server speaks HTTPS."""

    def __init__(
        self,
        respond: Callable[[list[str]], Answer] | None = None,
        *,
        credentials: tuple[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.respond = respond or (lambda uids: Answer(200, stow_response(uids)))
        self.credentials = credentials
        self.requests: list[Request] = []
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/dicom-web"
        self._thread: threading.Thread | None = None

    def _authorised(self, header: str | None) -> bool:
        if self.credentials is None:
            return True
        kind, secret = self.credentials
        if kind == "basic":
            return header == "Basic " + base64.b64encode(secret.encode()).decode("ascii")
        return header == f"Bearer {secret}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = bytearray()
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(data)
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def _send(self, answer: Answer) -> None:
                if answer.delay:
                    time.sleep(answer.delay)
                if isinstance(answer.body, dict):
                    payload = json.dumps(answer.body).encode()
                else:
                    payload = (answer.body or "").encode()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if payload:
                    self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                body = self._body()
                request = Request(self.path, self.headers.get("Authorization"))
                with server._lock:
                    server.requests.append(request)
                if not server._authorised(request.authorization):
                    self._send(Answer(401, None))
                    return
                request.uids = _stow_uids(self.headers.get("Content-Type", ""), body)
                answer = server.respond(request.uids)
                if answer.status < 300 or answer.status == 409:
                    with server._lock:
                        stored = _stored(answer, request.uids)
                        server.received.update(stored)
                self._send(answer)

            def do_GET(self) -> None:
                request = Request(self.path, self.headers.get("Authorization"))
                with server._lock:
                    server.requests.append(request)
                if not server._authorised(request.authorization):
                    self._send(Answer(401, None))
                    return
                self._send(Answer(200, "[]", "application/dicom+json"))

        return Handler

    def start(self) -> StowServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def destination(self, name: str = "vna", **settings: Any) -> dict[str, Any]:
        return {"name": name, "kind": "dicomweb", "url": self.url, "timeout": 5, **settings}


def _stored(answer: Answer, uids: list[str]) -> list[str]:
    """The UIDs the answer says were stored: its Referenced SOP Sequence, or every UID of a bare 200."""
    if isinstance(answer.body, dict):
        items = answer.body.get("00081199", {}).get("Value", [])
        return [str(i["00081155"]["Value"][0]) for i in items]
    return list(uids) if answer.status == 200 else []


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')


def _stow_uids(content_type: str, body: bytes) -> list[str]:
    """The SOP Instance UIDs of the application/dicom parts of a multipart/related body."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        return []
    uids = []
    for part in body.split(b"--" + match.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        _head, _, data = part.partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        if data:
            uids.append(str(pydicom.dcmread(BytesIO(data)).SOPInstanceUID))
    return uids
