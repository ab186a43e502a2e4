"""A small Storage SCP standing in for a PACS: the demo's PACS when Orthanc is not installed, and the tests'.

It records every instance it receives (SOP Instance UID -> times received), keeps the files when given a folder,
and can answer with a chosen failure status, or be stopped and started again on the same port (outage tests).
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



class Receiver:
    def __init__(self, ae_title: str = "PACS", status: int = 0x0000, store_dir: Path | None = None) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.status = status
        self.store_dir = store_dir
        self.received: Counter[str] = Counter()
        self.modalities: dict[str, str] = {}
        self.studies: dict[str, str] = {}  # SOP Instance UID -> Study Instance UID of what was received
        self.calling_aets: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] += 1
            self.modalities[str(ds.SOPInstanceUID)] = str(ds.get("Modality", ""))
            self.studies[str(ds.SOPInstanceUID)] = str(ds.get("StudyInstanceUID", ""))
            self.calling_aets.add(str(event.assoc.requestor.ae_title).strip())
        if self.store_dir is not None and self.status == 0:
            ds.file_meta = event.file_meta
            ds.save_as(self.store_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return self.status

    def start(self) -> Receiver:
        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def destination(self, name: str = "pacs") -> dict[str, Any]:
        return {"name": name, **self.known_ae()}

    def known_ae(self) -> dict[str, Any]:
        """This receiver as an entry of ``known_aes`` (where results go back to when it sent the study)."""
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port, "timeout": 5}
