"""Orthanc for the tests: :mod:`dicom_node.devtools.orthanc` re-exported, the ``orthanc_factory`` fixture, the
``requires_orthanc`` and ``requires_orthanc_dicomweb`` marks, and :class:`StoreRecorder`, a Storage SCP that
answers chosen statuses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import Status

from dicom_node.devtools.orthanc import *  # noqa: F403  (the Orthanc helpers, re-exported for the tests)
from dicom_node.devtools.orthanc import DICOMWEB_PLUGIN, ORTHANC_BINARY, Orthanc, free_ports, wait_until

LOGGER = logging.getLogger(__name__)

requires_orthanc = pytest.mark.skipif(
    not ORTHANC_BINARY.exists(),
    reason=f"Orthanc not installed at {ORTHANC_BINARY} (Debian package 'orthanc')",
)
requires_orthanc_dicomweb = pytest.mark.skipif(
    not (ORTHANC_BINARY.exists() and DICOMWEB_PLUGIN.exists()),
    reason=f"Orthanc or its DICOMweb plugin ({DICOMWEB_PLUGIN}, Debian package 'orthanc-dicomweb') not installed",
)


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Fixture: ``orthanc_factory(node=NodeModality(...), stable_age=1)`` starts an Orthanc, killed at teardown.

    Import it into a test module or a conftest.py (``from tests.orthanc import orthanc_factory``) to use it.
    """
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"Orthanc not installed at {ORTHANC_BINARY} (Debian package 'orthanc')")
    started: list[Orthanc] = []

    def make(**kwargs: Any) -> Orthanc:
        server = Orthanc(tmp_path / f"orthanc{len(started)}", **kwargs)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.kill()


class StoreRecorder:
    """A pynetdicom Storage SCP on a free loopback port that keeps what it receives.

    It stands in for the node when Orthanc routes to it, and for a PACS that answers what a test wants:
    ``respond(event)`` returns the C-STORE status (a named code, or a status Dataset with ErrorComment); it
    may abort the association (``event.assoc.abort()``). ``sop_classes`` / ``transfer_syntaxes`` limit what it
    accepts.
    """

    def __init__(
        self,
        ae_title: str = "AINODE",
        *,
        respond: Callable[[evt.Event], int | Dataset] | None = None,
        sop_classes: Sequence[str] | None = None,
        transfer_syntaxes: Sequence[str] | None = None,
        require_calling_aets: Sequence[str] = (),
        maximum_associations: int = 10,
        ssl_context: Any = None,
    ) -> None:
        self.ae_title = ae_title
        self.port = free_ports(1)[0]
        self.received: list[Dataset] = []
        self.calling_aets: list[str] = []
        self._respond = respond
        ae = AE(ae_title=ae_title)
        syntaxes = list(transfer_syntaxes or ALL_TRANSFER_SYNTAXES)
        classes = (
            list(sop_classes)
            if sop_classes is not None
            else [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        )
        for sop_class in classes:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(require_calling_aets)
        ae.maximum_associations = maximum_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        self._ae = ae
        self._ssl_context = ssl_context
        self._server: Any = None

    def _on_store(self, event: evt.Event) -> int | Dataset:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        self.calling_aets.append(str(event.assoc.requestor.ae_title))
        if self._respond is not None:
            return self._respond(event)
        return int(Status.SUCCESS)

    def start(self) -> StoreRecorder:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=self._ssl_context,
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> StoreRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.received]

    def wait_for(self, count: int, timeout: float = 20) -> list[Dataset]:
        """Wait until at least ``count`` instances have arrived; returns them."""
        wait_until(lambda: len(self.received) >= count, timeout, f"{count} instances at {self.ae_title}")
        return list(self.received)
