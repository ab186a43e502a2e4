"""Each kind of destination and its transport: the one place that maps ``destinations[].kind`` to a way of sending.

- ``dimse``: C-STORE to the configured AE (:mod:`dicom_node.export.scu`);
- ``dicomweb``: STOW-RS to the configured archive (:mod:`dicom_node.export.stow`);
- ``sender``: C-STORE back to the AE that sent the study: its calling AE title, recorded at intake, looked up in
  ``known_aes``. A sender missing from that table fails the destination for good, with a reason that names the AE
  title and the key to add: retrying cannot find an address that is not configured.

Every kind returns the same :class:`~dicom_node.export.outcome.SendReport`, so the export step records and
classifies them alike (per object, per destination, transient or permanent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from dicom_node.config import (
    AnyDestination,
    DestinationSettings,
    DicomWebDestinationSettings,
    SenderDestinationSettings,
    Settings,
)
from dicom_node.export import scu, stow
from dicom_node.export.outcome import AssociationResult, AssociationState, EchoResult, FileResult, Outcome, SendReport

__all__ = ["echo", "send", "sender_destination"]

log = logging.getLogger(__name__)


def sender_destination(
    destination: SenderDestinationSettings, settings: Settings, sender_ae: str | None
) -> DestinationSettings | str:
    """The DIMSE destination that ``sender_ae`` (the study's calling AE title) stands for, or why there is none."""
    if not sender_ae:
        return (
            f"destination {destination.name!r} (kind: sender): the study's calling AE title was not recorded at "
            "intake, so there is no sender to return the results to"
        )
    known = settings.known_ae(sender_ae)
    if known is None:
        listed = ", ".join(a.ae_title for a in settings.known_aes) or "none"
        return (
            f"the study was sent by AE title {sender_ae!r}, which is not in known_aes (listed: {listed}): add "
            f"{{ae_title: {sender_ae}, host: ..., port: ...}} to known_aes so that destination {destination.name!r} "
            "can return results to it"
        )
    return known.as_destination(destination.name)


def send(
    destination: AnyDestination,
    files: Sequence[Path],
    settings: Settings,
    *,
    sender_ae: str | None = None,
    on_delivered: Callable[[FileResult], None] | None = None,
) -> SendReport:
    """Send ``files`` to ``destination`` the way its kind says; ``sender_ae`` is the study's calling AE title (used
    by ``kind: sender``). Never raises for network or peer problems: see each transport's module."""
    match destination:
        case DicomWebDestinationSettings():
            return stow.send_files(destination, files, on_delivered=on_delivered)
        case SenderDestinationSettings():
            target = sender_destination(destination, settings, sender_ae)
            if isinstance(target, str):
                log.warning("results of a study cannot return to its sender: %s", target)
                return _not_sendable(destination.name, f"sender {sender_ae or '?'}", files, target)
            return scu.send_files(target, files, settings.node.ae_title, on_delivered=on_delivered)
        case _:
            return scu.send_files(destination, files, settings.node.ae_title, on_delivered=on_delivered)


def _not_sendable(name: str, peer: str, files: Sequence[Path], reason: str) -> SendReport:
    """A report of ``files`` rejected for good before anything was sent (a destination that cannot be resolved)."""
    report = SendReport(destination=name, peer=peer)
    report.associations.append(AssociationResult(AssociationState.REJECTED, reason, 0.0))
    report.files = [FileResult(Path(f), None, None, Outcome.REJECTED, None, "", reason) for f in files]
    return report


def echo(destination: AnyDestination, settings: Settings) -> list[EchoResult]:
    """Check that ``destination`` answers: C-ECHO (``dimse``), a QIDO-RS search (``dicomweb``), or a C-ECHO of every
    AE in ``known_aes`` (``sender``: any of them may be the next study's sender)."""
    match destination:
        case DicomWebDestinationSettings():
            return [stow.echo(destination)]
        case SenderDestinationSettings():
            return [
                scu.echo(known.as_destination(f"{destination.name}:{known.ae_title}"), settings.node.ae_title)
                for known in settings.known_aes
            ]
        case _:
            return [scu.echo(destination, settings.node.ae_title)]
