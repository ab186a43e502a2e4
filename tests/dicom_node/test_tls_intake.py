"""DICOM TLS on intake (PS3.15 Annex B) against dcmtk's storescu and echoscu with their TLS options."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import yaml
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import ConfigError, load_settings
from dicom_node.node import Node
from tests.conftest import make_study
from tests.dicom_node.test_intake import wait_for

pytestmark = pytest.mark.integration


def tls_node(running_node: Callable[..., Node], pki: Path, mutual: bool = True, **node: object) -> Node:
    settings: dict[str, object] = {"tls_cert_file": str(pki / "node.pem"), "tls_key_file": str(pki / "node.key")}
    if mutual:
        settings["tls_ca_file"] = str(pki / "ca.pem")
    return running_node(node={**settings, **node})


def dcmtk(
    tool: str, node: Node, pki: Path, *args: str, client: str | None = "pacs"
) -> subprocess.CompletedProcess[str]:
    """storescu or echoscu over TLS, trusting ``ca``, with the ``client`` certificate (None: plain TCP)."""
    tls = [] if client is None else ["+tls", str(pki / f"{client}.key"), str(pki / f"{client}.pem"),
                                     "+cf", str(pki / "ca.pem")]  # fmt: skip
    files = [a for a in args if not a.startswith("-")]
    options = [a for a in args if a.startswith("-")]
    return subprocess.run(
        [tool, *tls, *options, "-aec", "AINODE", "127.0.0.1", str(node.port), *files],
        capture_output=True, text=True, timeout=30,
    )


def test_a_study_over_mutual_tls_is_stored(running_node: Callable[..., Node], pki: Path, tmp_path: Path) -> None:
    node = tls_node(running_node, pki)
    files = make_study(tmp_path / "s", 3)
    sent = dcmtk("storescu", node, pki, *map(str, files))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    for f in files:
        assert node.store.has_instance(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    assert dcmtk("echoscu", node, pki).returncode == 0
    assert node.intake.counters.rejected_associations == 0


def test_peers_without_tls_or_without_a_trusted_certificate_are_refused(
    running_node: Callable[..., Node], pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = tls_node(running_node, pki)
    [path] = make_study(tmp_path / "s", 1)
    plain = dcmtk("storescu", node, pki, str(path), client=None)
    assert plain.returncode != 0
    untrusted = dcmtk("storescu", node, pki, str(path), client="stranger")  # signed by another CA
    assert untrusted.returncode != 0
    assert not node.store.has_instance(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    wait_for(lambda: node.intake.counters.rejected_associations == 2)
    assert node.intake.refusals.by_reason["tls_handshake"] == 2
    assert caplog.text.count("TLS handshake failed") == 2  # one line each: the two failed for different reasons
    # The reason, in words an administrator can act on.
    assert "the peer did not start TLS" in caplog.text
    assert "certificate is not signed by a CA in node.tls_ca_file" in caplog.text
    # The node keeps serving the peers it trusts.
    assert dcmtk("storescu", node, pki, str(path)).returncode == 0


def test_without_tls_ca_file_any_tls_peer_is_accepted(
    running_node: Callable[..., Node], pki: Path, tmp_path: Path
) -> None:
    node = tls_node(running_node, pki, mutual=False)
    [path] = make_study(tmp_path / "s", 1)
    assert dcmtk("storescu", node, pki, str(path), client="stranger").returncode == 0


def test_a_port_check_is_no_rejected_association(
    running_node: Callable[..., Node], pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Monitoring and load balancers connect and close (or reset) without a byte: an INFO line, not a warning."""
    caplog.set_level(logging.INFO, logger="dicom_node.intake.server")
    node = tls_node(running_node, pki)
    with socket.create_connection(("127.0.0.1", node.port)):
        pass
    with socket.create_connection(("127.0.0.1", node.port)) as reset:
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: node.intake.refusals.by_reason["no_request"] == 2)
    # One line a minute per source and reason: the second port check is counted, not logged again.
    assert caplog.text.count("closed before its TLS handshake began") == 1
    assert node.intake.counters.rejected_associations == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    [path] = make_study(tmp_path / "s", 1)
    assert dcmtk("storescu", node, pki, str(path)).returncode == 0


def test_a_peer_that_never_finishes_its_handshake_holds_up_no_one(
    running_node: Callable[..., Node], pki: Path, tmp_path: Path
) -> None:
    node = tls_node(running_node, pki, acse_timeout=120)
    [path] = make_study(tmp_path / "s", 1)
    with socket.create_connection(("127.0.0.1", node.port)) as silent:  # connects, then says nothing
        sent = dcmtk("storescu", node, pki, str(path))  # within storescu's 30 s, far below the 120 s time-out
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert silent.fileno() >= 0


def test_tls_settings_are_checked_and_name_the_key(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node\.tls_cert_file and node\.tls_key_file go together"):
        load_settings(None, {"node": {"tls_cert_file": str(pki / "node.pem")}})
    with pytest.raises(ConfigError, match=r"node\.tls_ca_file .* needs node\.tls_cert_file"):
        load_settings(None, {"node": {"tls_ca_file": str(pki / "ca.pem")}})
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {
        "tls_cert_file": str(pki / "node.pem"), "tls_key_file": str(tmp_path / "missing.key"),
    }}))  # fmt: skip
    checked = CliRunner().invoke(app, ["config", "check", "--config", str(config)])
    assert checked.exit_code == 2
    assert "tls_key_file" in checked.output and "missing.key" in checked.output
    config.write_text(yaml.safe_dump({"node": {
        "tls_cert_file": str(pki / "node.pem"), "tls_key_file": str(pki / "node.key"),
        "tls_ca_file": str(pki / "ca.pem"),
    }}))  # fmt: skip
    checked = CliRunner().invoke(app, ["config", "check", "--config", str(config)])
    assert checked.exit_code == 0, checked.output
    assert "DICOM TLS, peer certificates signed by" in checked.output


def _client_hello() -> bytes:
    """The first flight of a TLS client, as bytes (made in memory: no connection)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_a_peer_that_trickles_its_tls_handshake_is_cut_off_at_the_acse_timeout(
    running_node: Callable[..., Node], pki: Path
) -> None:
    """The handshake has one deadline, not one per read (CPython's ``do_handshake`` counts the socket's time-out
    from its start), so a ClientHello sent a byte every 0.25 s cannot hold the connection's thread."""
    node = tls_node(running_node, pki, acse_timeout=2)
    hello = _client_hello()
    began = time.monotonic()
    closed = False
    with socket.create_connection(("127.0.0.1", node.port)) as peer:
        peer.settimeout(0.25)
        for byte in hello:  # hundreds of bytes: over a minute at this pace
            try:
                peer.sendall(bytes((byte,)))
                if peer.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
            if time.monotonic() - began > 30:
                break
    assert closed, "the node kept the handshake open while the ClientHello trickled in"
    wait_for(lambda: node.intake.refusals.by_reason["tls_handshake"] == 1)
