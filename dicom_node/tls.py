"""DICOM TLS (PS3.15 Annex B, the BCP 195 profiles): the :class:`ssl.SSLContext` of each side, TLS 1.2 or newer.

Towards a destination (:func:`client_context`): the destination's ``tls_ca_file`` is the trust anchor for the
peer's certificate (the PACS certificate or the CA that signed it); ``tls_cert_file`` and ``tls_key_file`` are our
own certificate and key, needed when the peer asks for client certificates. The peer's name is checked against
``host`` (a DNS name, or an IP address in the certificate's subjectAltName).

On intake (:func:`server_context`): ``node.tls_cert_file`` and ``node.tls_key_file`` are the node's certificate
and key; with ``node.tls_ca_file`` a PACS must present a certificate signed by one of those CAs (mutual TLS), the
profile's recommendation for a network where the node cannot tell senders apart otherwise.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from dicom_node.config import DestinationSettings, NodeSettings

__all__ = ["TLSConfigError", "client_context", "server_context"]


class TLSConfigError(ValueError):
    """TLS files (a destination's or the node's own) cannot be used; the message names the setting and the file."""


def client_context(destination: DestinationSettings) -> ssl.SSLContext:
    """A client context for ``destination``: TLS 1.2 or newer, peer certificate and host name verified."""
    if destination.tls_ca_file is None:
        raise TLSConfigError(f"destination {destination.name!r}: tls: true needs tls_ca_file, got none")
    if (destination.tls_cert_file is None) != (destination.tls_key_file is None):
        raise TLSConfigError(
            f"destination {destination.name!r}: tls_cert_file and tls_key_file go together, got "
            f"tls_cert_file={destination.tls_cert_file}, tls_key_file={destination.tls_key_file}"
        )
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    who = f"destination {destination.name!r}"
    _load_ca(context, who, destination.tls_ca_file)
    if destination.tls_cert_file is not None and destination.tls_key_file is not None:
        _load_pair(context, who, destination.tls_cert_file, destination.tls_key_file)
    return context


def _load_ca(context: ssl.SSLContext, who: str, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"{who}: tls_ca_file {ca_file} is not a readable PEM certificate file ({exc})") from None


def _load_pair(context: ssl.SSLContext, who: str, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"{who}: cannot load tls_cert_file {cert_file} with tls_key_file {key_file} ({exc})"
        ) from None


def server_context(node: NodeSettings) -> ssl.SSLContext | None:
    """The intake's context (None when intake is plain TCP); :class:`TLSConfigError` names an unusable file."""
    if node.tls_cert_file is None or node.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, "node", node.tls_cert_file, node.tls_key_file)
    if node.tls_ca_file is not None:
        _load_ca(context, "node", node.tls_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
