"""Results to a DICOMweb archive: STOW-RS (PS3.18 10.5) through ``dicomweb-client``, and a QIDO-RS search for
``dicom-node echo``.

:func:`send_files` mirrors :func:`dicom_node.export.scu.send_files`: it never raises for what a network or a server
can do, and returns a :class:`~dicom_node.export.outcome.SendReport` in which each file is ``delivered``,
``rejected`` (permanent) or ``transient`` (worth retrying), with a reason an IT administrator can act on. Files go
in requests of at most ``objects_per_request`` objects and ``max_request_mb``; each request's delivered objects are
handed to ``on_delivered`` as soon as its answer arrives, before the next request goes out.

Classification rules
--------------------
Per request (every file of the request gets its outcome):

- no answer: connection refused, name not resolved, host unreachable, connect or read time-out, connection lost:
  ``transient``; the files of the later requests are not tried (the server is not there);
- TLS: certificate not trusted, handshake failed, unusable CA bundle or client certificate: ``rejected``;
- HTTP 408, 429 and 5xx: ``transient``;
- HTTP 409 and 2xx: the answer's Store Instances Response Module says, object by object (below);
- any other HTTP 4xx (400 malformed, 401 credentials, 403 permissions, 404 wrong URL, 413 too large, 415...):
  ``rejected``, with the code and what to check; the later requests are not tried either.

Per object, from the answer of a 2xx or 409 (PS3.18 10.5.3):

- in Referenced SOP Sequence: ``delivered`` (a Warning Reason is named in the reason);
- in Failed SOP Sequence: by its Failure Reason, as a C-STORE status (the same codes:
  :func:`~dicom_node.export.outcome.classify_store_status`): A7xx Out of Resources ``transient``, any other
  ``rejected``;
- in neither: after 200 OK (all stored) ``delivered``; after 202 Accepted (some stored) ``transient`` (the server
  did not say, and sending it again is harmless: result UIDs are fixed, DESIGN invariant 2); after 409 Conflict
  (none stored) ``rejected``.

A 2xx whose body is not a STOW-RS answer (an HTML page from a proxy or a login portal) is ``rejected``: the URL
does not lead to a DICOMweb service, whatever it claims.

HTTP retries are the node's (``queue.retry``), not the client library's: dicomweb-client's own retrying is off.
Credentials are kept out of URLs, logs and reasons; requests carry them through ``requests``' auth hooks.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.config import DicomWebDestinationSettings
from dicom_node.export.outcome import (
    AssociationResult,
    AssociationState,
    EchoResult,
    FileResult,
    Outcome,
    SendReport,
    classify_association,
    classify_store_status,
    status_name,
)
from dicom_node.logs import uid_hash

__all__ = ["echo", "peer_label", "send_files"]

log = logging.getLogger(__name__)

#: PS3.18 Table 10.5.3-2's failure reason that is not a C-STORE status of PS3.4.
_STOW_STATUS_NAMES = {0xC122: "Referenced Transfer Syntax not supported"}
_DICOM_JSON = ("application/dicom+json", "application/json")
_TRANSIENT_HTTP = {HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS}


def peer_label(destination: DicomWebDestinationSettings) -> str:
    """How an administrator names a DICOMweb peer: its base URL (never with credentials: the settings refuse them)."""
    return destination.url


def _status_name(code: int) -> str:
    return _STOW_STATUS_NAMES.get(code) or status_name(code)


# -- the HTTP session --------------------------------------------------------------------------------------------


class _BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` on each request; the token stays in this object, out of any header dict
    that a library might log."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


class _ConfiguredVerification(requests.adapters.HTTPAdapter):
    """Verifies HTTPS as the destination's settings say, whatever the environment says.

    ``requests`` lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` replace a session's ``verify`` (psf/requests
    #3829), so a set ``tls_ca_file`` or ``tls_verify: false`` would silently give way to the process environment;
    this adapter passes the configured value on every request instead."""

    def __init__(self, verify: bool | str) -> None:
        super().__init__()
        self._verify = verify

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["verify"] = self._verify
        return super().send(request, **kwargs)


def _session(destination: DicomWebDestinationSettings) -> requests.Session:
    session = requests.Session()
    if destination.auth == "basic" and destination.username and destination.password is not None:
        session.auth = requests.auth.HTTPBasicAuth(destination.username, destination.password.get_secret_value())
    elif destination.auth == "bearer" and destination.token is not None:
        session.auth = _BearerAuth(destination.token.get_secret_value())
    if not destination.tls_verify:
        session.mount("https://", _ConfiguredVerification(False))
    elif destination.tls_ca_file is not None:
        session.mount("https://", _ConfiguredVerification(str(destination.tls_ca_file)))
    # else requests' own: its CA bundle (certifi), or the one REQUESTS_CA_BUNDLE names
    if destination.tls_cert_file is not None and destination.tls_key_file is not None:
        session.cert = (str(destination.tls_cert_file), str(destination.tls_key_file))
    # The answer of a STOW-RS request in JSON (PS3.18 8.7.3), the form this module reads error bodies in.
    session.headers["Accept"] = "application/dicom+json"
    return session


@contextmanager
def _client(destination: DicomWebDestinationSettings) -> Iterator[tuple[Any, list[requests.Response]]]:
    """A ``DICOMwebClient`` for ``destination`` and the list its HTTP answers are appended to (a response hook: the
    client returns the parsed body and not the status code, which tells 200 from 202)."""
    from dicomweb_client.api import DICOMwebClient

    for warning in destination.warnings():
        log.warning("%s", warning)
    answers: list[requests.Response] = []
    session = _session(destination)

    def keep(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        answers.append(response)
        return response

    client = DICOMwebClient(
        destination.url, session=session, callback=keep, timeout=(destination.timeout, destination.timeout)
    )
    client.set_http_retry_params(retry=False)  # one retry policy for the node: queue.retry
    try:
        with warnings.catch_warnings():
            if not destination.tls_verify:  # warned above, once per send rather than once per request
                from urllib3.exceptions import InsecureRequestWarning

                warnings.simplefilter("ignore", InsecureRequestWarning)
            yield client, answers
    finally:
        session.close()


# -- what went wrong with a request ------------------------------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the exceptions it wraps (requests wraps urllib3's, which wrap the socket's), and their causes."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(a for a in current.args if isinstance(a, BaseException))
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


_SSL_WORDS = re.compile(r"\[SSL[^\]]*\]\s*([^(]+?)\s*(?:\(_ssl\.c|$)")


def _tls_words(exc: BaseException) -> str:
    """The OpenSSL reason of a TLS failure (``certificate verify failed: self-signed certificate``)."""
    for cause in _causes(exc):
        match = _SSL_WORDS.search(str(cause))
        if match:
            return match.group(1).strip().rstrip(":")
    return str(exc)


def _connection_failure(exc: requests.RequestException, destination: DicomWebDestinationSettings) -> AssociationResult:
    """Why a request got no HTTP answer, as an association state and a reason (elapsed filled in by the caller)."""
    peer = peer_label(destination)
    causes = list(_causes(exc))
    if isinstance(exc, requests.exceptions.SSLError):
        hint = (
            "set tls_ca_file to the CA that signed the server's certificate"
            if "verify failed" in _tls_words(exc)
            else "check the server's TLS set-up and tls_cert_file / tls_key_file"
        )
        return AssociationResult(AssociationState.TLS_FAILED, f"TLS with {peer} failed: {_tls_words(exc)} ({hint})", 0)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return AssociationResult(
            AssociationState.TIMEOUT,
            f"no connection to {peer} within {destination.timeout:g} s (host down, firewall, or wrong address)",
            0,
        )
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return AssociationResult(
            AssociationState.TIMEOUT, f"no answer from {peer} within {destination.timeout:g} s", 0
        )
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return AssociationResult(
            AssociationState.REFUSED,
            f"connection refused by {peer}: nothing listens on that port (is the server running, is the url right?)",
            0,
        )
    if any(_unreachable(c) for c in causes):
        return AssociationResult(AssociationState.UNREACHABLE, f"{peer} is unreachable (host name or route)", 0)
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.ChunkedEncodingError):
        return AssociationResult(AssociationState.ABORTED, f"connection to {peer} lost before the answer", 0)
    return AssociationResult(AssociationState.REJECTED, f"request to {peer} cannot be made: {exc}", 0)


def _unreachable(exc: BaseException) -> bool:
    """A host name that does not resolve (urllib3's NameResolutionError), or no route to the host."""
    if type(exc).__name__ == "NameResolutionError":
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN)


def _http_failure(
    response: requests.Response, destination: DicomWebDestinationSettings, what: str, size: str = ""
) -> AssociationResult:
    """An HTTP error answer as an association state and a readable reason (elapsed filled in by the caller)."""
    code = response.status_code
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = response.reason or "HTTP error"
    said = f"{code} {phrase} from {peer_label(destination)}"
    if code == HTTPStatus.UNAUTHORIZED:
        who = f"auth: {destination.auth}" + (f", username {destination.username!r}" if destination.username else "")
        hint = "check the credentials" if destination.auth != "none" else "the server wants credentials: set auth"
        return AssociationResult(AssociationState.REJECTED, f"{said}: {hint} ({who})", 0)
    if code == HTTPStatus.FORBIDDEN:
        return AssociationResult(
            AssociationState.REJECTED, f"{said}: the account is not allowed to {what} there (check its permissions)", 0
        )
    if code == HTTPStatus.NOT_FOUND:
        return AssociationResult(
            AssociationState.REJECTED,
            f"{said}: no {what} service there (url must be the DICOMweb base, e.g. https://host/dicom-web)",
            0,
        )
    if code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        return AssociationResult(
            AssociationState.REJECTED,
            f"{said}: the request{size} is over the server's upload limit (lower objects_per_request or "
            "max_request_mb, or raise the server's limit)",
            0,
        )
    if code in _TRANSIENT_HTTP or code == HTTPStatus.SERVICE_UNAVAILABLE:
        state = AssociationState.TIMEOUT if code == HTTPStatus.REQUEST_TIMEOUT else AssociationState.BUSY
        return AssociationResult(state, f"{said}: the server is busy; trying again later", 0)
    if code >= 500:
        return AssociationResult(AssociationState.SERVER_ERROR, f"{said}: the server failed; trying again later", 0)
    # The server's own text is not copied: it may quote the data set it refused (patient data), and the reason is
    # logged. Its log holds the details; the code and phrase say where to look.
    return AssociationResult(AssociationState.REJECTED, f"{said}: the server refuses the request (see its log)", 0)


# -- STOW-RS -----------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    index: int
    path: Path
    sop_instance: str
    sop_class: str
    transfer_syntax: str | None
    size: int

    def result(self, outcome: Outcome, reason: str, status: int | None = None) -> FileResult:
        name = _status_name(status) if status is not None else ""
        return FileResult(
            self.path, self.sop_instance, self.sop_class, outcome, status, name, reason, self.transfer_syntax
        )


def _read(index: int, path: Path, *, header_only: bool = False) -> tuple[_Item, Dataset] | str:
    """The file as a data set to send (``header_only``: enough to name it), or why it cannot be sent."""
    try:
        ds = dcmread(path, stop_before_pixels=header_only)
    except (OSError, InvalidDicomError) as exc:
        return f"cannot read {path}: {exc}"
    except Exception as exc:  # pydicom raises many kinds for a damaged file
        return f"cannot parse {path} as DICOM: {exc}"
    meta = getattr(ds, "file_meta", None)
    sop_instance = ds.get("SOPInstanceUID")
    sop_class = ds.get("SOPClassUID")
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if not sop_instance or not sop_class or not syntax:
        return f"{path} lacks SOP Class UID, SOP Instance UID or Transfer Syntax UID: not a file that can be sent"
    return _Item(index, path, str(sop_instance), str(sop_class), str(syntax), path.stat().st_size), ds


def _requests(destination: DicomWebDestinationSettings, paths: Sequence[Path]) -> Iterator[list[int]]:
    """Indexes of ``paths`` by request: at most ``objects_per_request`` objects and ``max_request_mb`` in all (an
    object larger than that goes alone)."""
    limit = destination.max_request_mb * 1e6
    batch: list[int] = []
    size = 0
    for index, path in enumerate(paths):
        try:
            this = path.stat().st_size
        except OSError:
            this = 0  # unreadable: it is found out and rejected when read
        if batch and (len(batch) >= destination.objects_per_request or size + this > limit):
            yield batch
            batch, size = [], 0
        batch.append(index)
        size += this
    if batch:
        yield batch


#: What dicomweb-client raises when it parses an answer that says it is DICOM JSON (or XML) and is not.
_BROKEN_BODY = (ValueError, TypeError, KeyError, AttributeError)


def _not_json(destination: DicomWebDestinationSettings, exc: BaseException) -> str:
    """Why an answer that claims to be DICOM JSON could not be read. The parser's words are not copied: they may
    quote the body (a data set's values)."""
    return f"{peer_label(destination)} answered with a body that claims DICOM JSON and is not ({type(exc).__name__})"


def _redirected(answers: Sequence[requests.Response], destination: DicomWebDestinationSettings) -> str:
    """Why a request that was redirected and turned into another method (301/302/303: a POST became a GET) did not
    store anything; "" when it was not (307 and 308 keep the POST and its body, and are followed)."""
    final = answers[-1] if answers else None
    if final is None or not final.history or final.request.method == "POST":
        return ""
    where = final.history[0].headers.get("Location", "another address")
    return (
        f"{peer_label(destination)} redirects STOW-RS to {where} (HTTP {final.history[0].status_code}), where the "
        "request arrives without its objects: set url to the address it names"
    )


def _stow_answer(response: requests.Response) -> Dataset | None:
    """The Store Instances Response Module of an answer; None when the body is not one (empty: ``Dataset()``)."""
    if not response.content.strip():
        return Dataset()
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in _DICOM_JSON:
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, json.JSONDecodeError):
        return None


def _code(value: Any) -> int | None:
    """A Failure or Warning Reason (US) as a number; None when absent or not a number."""
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _object_outcomes(
    answer: Dataset, code: int, items: Sequence[_Item], destination: DicomWebDestinationSettings
) -> list[FileResult]:
    """Each object's outcome from a STOW-RS answer with HTTP status ``code`` (see the module docstring)."""
    peer = peer_label(destination)
    stored: dict[str, Dataset] = {}
    failed: dict[str, Dataset] = {}
    for item in answer.get("ReferencedSOPSequence", []) or []:
        stored[str(item.get("ReferencedSOPInstanceUID", ""))] = item
    for item in answer.get("FailedSOPSequence", []) or []:
        failed[str(item.get("ReferencedSOPInstanceUID", ""))] = item
    results = []
    for it in items:
        result = it.result
        if it.sop_instance in failed:
            status = _code(failed[it.sop_instance].get("FailureReason"))
            if status is None:
                results.append(result(Outcome.REJECTED, f"{peer} failed to store it without a reason (HTTP {code})"))
                continue
            outcome = classify_store_status(status)
            if outcome is Outcome.DELIVERED:  # a "failure" carrying a warning or success code: take the code's word
                outcome = Outcome.REJECTED
            verb = "temporarily unable to store it" if outcome is Outcome.TRANSIENT else "refused it"
            results.append(result(outcome, f"{peer} {verb}: 0x{status:04X} ({_status_name(status)})", status))
        elif it.sop_instance in stored:
            status = _code(stored[it.sop_instance].get("WarningReason"))
            if status is None:
                results.append(result(Outcome.DELIVERED, ""))
            else:
                results.append(
                    result(Outcome.DELIVERED, f"stored with warning 0x{status:04X} ({_status_name(status)})", status)
                )
        elif code == HTTPStatus.OK:
            results.append(result(Outcome.DELIVERED, ""))
        elif code == HTTPStatus.CONFLICT:
            results.append(result(Outcome.REJECTED, f"409 Conflict from {peer}: none of the request's objects stored"))
        else:
            results.append(
                result(Outcome.TRANSIENT, f"{code} from {peer} without a word on this object; it is sent again")
            )
    return results


def send_files(
    destination: DicomWebDestinationSettings,
    files: Sequence[Path],
    *,
    on_delivered: Callable[[FileResult], None] | None = None,
) -> SendReport:
    """STOW-RS ``files`` to ``destination``; never raises for network, server or file problems (see the module
    docstring). ``on_delivered(result)`` is called for each file the server stored, as soon as the answer of its
    request arrives and before the next request goes out; whatever it raises propagates."""
    started = time.monotonic()
    peer = peer_label(destination)
    paths = [Path(f) for f in files]
    report = SendReport(destination=destination.name, peer=peer)
    results: dict[int, FileResult] = {}
    if not paths:
        report.associations.append(AssociationResult(AssociationState.NOT_ATTEMPTED, "", 0.0))
    with _client(destination) as (client, answers):
        stopped: AssociationResult | None = None  # the server cannot be reached, or refuses every request
        for batch in _requests(destination, paths):
            items: list[_Item] = []
            datasets: list[Dataset] = []
            for index in batch:
                read = _read(index, paths[index], header_only=stopped is not None)
                if isinstance(read, str):
                    results[index] = FileResult(paths[index], None, None, Outcome.REJECTED, None, "", read)
                    log.warning("STOW-RS to %s skips an unreadable file: %s", peer, read)
                    continue
                items.append(read[0])
                datasets.append(read[1])
            if not items:
                continue
            if stopped is not None:
                for it in items:
                    results[it.index] = it.result(classify_association(stopped.state), stopped.reason)
                continue
            request = _stow(client, answers, datasets, items, destination)
            report.associations.append(request.association)
            answered = request.association.established
            for file_result, it in zip(request.files, items, strict=True):
                results[it.index] = file_result
                if file_result.outcome is Outcome.DELIVERED:
                    if on_delivered is not None:
                        on_delivered(file_result)
                elif answered:  # the server's word on this object (a failed request is logged once, below)
                    log.warning(
                        "STOW-RS of instance %s to %s %s: %s",
                        uid_hash(it.sop_instance), destination.name, file_result.outcome.value, file_result.reason,
                    )  # fmt: skip
            counts = {o: sum(1 for f in request.files if f.outcome is o) for o in Outcome}
            log.log(
                logging.INFO if answered else logging.WARNING,
                "STOW-RS %s (%s): %d delivered, %d rejected, %d transient in %.2f s, %s%s",
                destination.name, peer, counts[Outcome.DELIVERED], counts[Outcome.REJECTED], counts[Outcome.TRANSIENT],
                request.association.elapsed_s, request.association.state.value,
                "" if answered else f": {request.association.reason}",
            )  # fmt: skip
            if not answered:
                stopped = request.association
    report.files = [results[i] for i in sorted(results)]
    report.elapsed_s = time.monotonic() - started
    return report


@dataclass
class _Request:
    association: AssociationResult
    files: list[FileResult]


def _stow(
    client: Any,
    answers: list[requests.Response],
    datasets: list[Dataset],
    items: list[_Item],
    destination: DicomWebDestinationSettings,
) -> _Request:
    """One STOW-RS request of ``datasets``: its outcome and each object's."""
    started = time.monotonic()
    answers.clear()
    peer = peer_label(destination)

    def everyone(association: AssociationResult) -> _Request:
        association = AssociationResult(association.state, association.reason, time.monotonic() - started)
        outcome = classify_association(association.state)
        return _Request(association, [it.result(outcome, association.reason) for it in items])

    try:
        client.store_instances(datasets)
    except requests.HTTPError as exc:
        response = exc.response
        if response is None or response.status_code != HTTPStatus.CONFLICT:
            if response is None:
                return everyone(AssociationResult(AssociationState.ABORTED, f"no answer from {peer}: {exc}", 0))
            size = f" of {len(items)} object(s), {sum(i.size for i in items) / 1e6:.1f} MB"
            return everyone(_http_failure(response, destination, "store (STOW-RS)", size))
    except requests.exceptions.JSONDecodeError as exc:  # a RequestException too, but the answer did arrive
        reason = _redirected(answers, destination) or _not_json(destination, exc)
        return everyone(AssociationResult(AssociationState.REJECTED, reason, 0))
    except requests.RequestException as exc:
        return everyone(_connection_failure(exc, destination))
    except OSError as exc:  # requests checks the CA bundle and client certificate files before connecting
        return everyone(
            AssociationResult(
                AssociationState.TLS_FAILED, f"TLS files of destination {destination.name!r} are unusable: {exc}", 0
            )
        )
    except _BROKEN_BODY as exc:  # an answer that claims DICOM JSON and is not: dicomweb-client parses it
        moved = _redirected(answers, destination)
        reason = moved or _not_json(destination, exc)
        return everyone(AssociationResult(AssociationState.REJECTED, reason, 0))
    response = answers[-1]
    moved = _redirected(answers, destination)
    if moved:
        return everyone(AssociationResult(AssociationState.REJECTED, moved, 0))
    answer = _stow_answer(response)
    elapsed = time.monotonic() - started
    if answer is None:
        kind = response.headers.get("Content-Type", "no content type")
        return everyone(
            AssociationResult(
                AssociationState.REJECTED,
                f"{peer} answered HTTP {response.status_code} with {kind}, not a STOW-RS answer (is url the DICOMweb "
                "base of the archive?)",
                0,
            )
        )
    files = _object_outcomes(answer, response.status_code, items, destination)
    return _Request(AssociationResult(AssociationState.ANSWERED, "", elapsed), files)


# -- QIDO-RS as echo ---------------------------------------------------------------------------------------------


def echo(destination: DicomWebDestinationSettings, *, clock: Callable[[], float] = time.perf_counter) -> EchoResult:
    """Ask ``destination`` for one study (QIDO-RS ``GET {url}/studies?limit=1``): ok and round trip, or the exact
    failure (refused, certificate, credentials...). What the search finds is not read, let alone logged."""
    peer = peer_label(destination)
    started = clock()

    def failed(association: AssociationResult, status: int | None = None) -> EchoResult:
        result = EchoResult(
            destination.name, peer, False, association.state, association.reason, None,
            (clock() - started) * 1000, status, "QIDO-RS",
        )  # fmt: skip
        log.warning(
            "QIDO-RS echo of %s (%s) failed (%s): %s", destination.name, peer, result.state.value, result.reason
        )
        return result

    with _client(destination) as (client, answers):
        try:
            client.search_for_studies(limit=1, fields=["StudyInstanceUID"])
        except requests.HTTPError as exc:
            if exc.response is None:
                return failed(AssociationResult(AssociationState.ABORTED, f"no answer from {peer}", 0))
            return failed(_http_failure(exc.response, destination, "search (QIDO-RS)"), exc.response.status_code)
        except requests.exceptions.JSONDecodeError as exc:
            return failed(AssociationResult(AssociationState.REJECTED, _not_json(destination, exc), 0))
        except requests.RequestException as exc:
            return failed(_connection_failure(exc, destination))
        except OSError as exc:
            return failed(
                AssociationResult(
                    AssociationState.TLS_FAILED, f"TLS files of destination {destination.name!r} are unusable: {exc}", 0
                )
            )
        except _BROKEN_BODY as exc:
            return failed(AssociationResult(AssociationState.REJECTED, _not_json(destination, exc), 0))
    response = answers[-1]
    round_trip = response.elapsed.total_seconds() * 1000
    result = EchoResult(
        destination.name, peer, True, AssociationState.ANSWERED, "", round_trip, (clock() - started) * 1000,
        response.status_code, "QIDO-RS",
    )  # fmt: skip
    log.info("QIDO-RS echo of %s (%s) ok in %.1f ms", destination.name, peer, round_trip)
    return result
