"""Logging for the node: configured once by the application; library code only calls ``logging.getLogger``.

No patient data in logs (DESIGN invariant 8): UIDs are logged as short hashes (:func:`uid_hash`, defined with the
findings contract so that the workers' libraries hash alike), names and IDs
never. The audit log (``<data_dir>/audit.log``, one JSON object per line) records every association and every
export.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from dicom_node.permissions import private_dir, private_file
from sr_writer.findings import uid_hash  # the one definition, shared with the workers' libraries

__all__ = ["AUDIT_LOGGER", "HashQuotedValues", "audit", "configure_logging", "hash_quoted", "uid_hash"]

AUDIT_LOGGER = "dicom_node.audit"
_audit = logging.getLogger(AUDIT_LOGGER)


_QUOTED = re.compile(r"'([^']*)'")


def hash_quoted(text: str) -> str:
    """``text`` with every single-quoted value replaced by its hash: for library messages that quote what a peer
    sent (a UID, a name), which may be patient data (DESIGN invariant 8)."""
    return _QUOTED.sub(lambda m: f"<{uid_hash(m.group(1))}>", text)


class HashQuotedValues(logging.Filter):
    """Rewrites a record's message with :func:`hash_quoted` (installed on the loggers of libraries that quote
    received values: pynetdicom's, as the node installs it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "'" in message:
            record.msg, record.args = hash_quoted(message), None
        return True


def audit(event: str, **fields: Any) -> None:
    """One audit record: an association, a rejection, an export. Callers pass no patient data."""
    _audit.info(json.dumps({"at": round(time.time(), 3), "event": event, **fields}, sort_keys=True, default=str))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "at": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "INFO", json_format: bool = False, data_dir: Path | None = None) -> None:
    """Console logging for the process, and the audit log file under ``data_dir`` when given."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(
        _JsonFormatter()
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root.addHandler(console)
    root.setLevel(level)
    # Python warnings (pydicom's, mostly) as log records: one format, and the node's filters apply to them.
    logging.captureWarnings(True)
    # pynetdicom logs every PDU, highdicom every copied module and dicomweb-client every request at INFO; warnings
    # are what an administrator needs (the export logs each send itself).
    for noisy in ("pynetdicom", "highdicom", "dicomweb_client"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # retrying (dicomweb-client's) logs each failed HTTP request with a traceback at WARNING; the export logs the same
    # failure once, with its reason.
    logging.getLogger("retrying").setLevel(max(logging.ERROR, logging.getLevelName(level)))
    for handler in list(_audit.handlers):
        _audit.removeHandler(handler)
    if data_dir is not None:
        private_dir(data_dir)
        audit_file = logging.FileHandler(private_file(data_dir / "audit.log"), encoding="utf-8")
        audit_file.setFormatter(logging.Formatter("%(message)s"))
        _audit.addHandler(audit_file)
        _audit.propagate = False  # the audit trail goes to its own file, not the console
    _audit.setLevel(logging.INFO)
