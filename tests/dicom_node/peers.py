"""A misbehaving peer for bad-input tests: sends C-STORE data set bytes exactly as given, without checking them.

pynetdicom's ``send_c_store`` decodes and validates what it sends; a broken modality does not, so this helper
builds the C-STORE request itself and drives the association's DIMSE layer directly.
"""

from __future__ import annotations

import time
from io import BytesIO

from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE


def send_raw(port: int, sop_class: str, sop_uid: str, transfer_syntax: str, data: bytes) -> int:
    ae = AE(ae_title="BROKENSCU")
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established, "association was not accepted"
    try:
        context = assoc.accepted_contexts[0]
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_uid
        req.Priority = 2
        req.DataSet = BytesIO(data)
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)
    finally:
        assoc.release()
