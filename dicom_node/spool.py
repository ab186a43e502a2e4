"""The spool: received instances on disk, byte for byte as the peer sent them, written so that none is lost.

Layout: ``<data_dir>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. UIDs from the network
are validated before they become path components, so no peer can write outside the spool.

A write is durable before it returns: temporary file in the target directory, ``fsync``, atomic ``rename``,
``fsync`` of the directory (and of any directory it had to create).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

__all__ = ["InvalidUIDError", "Spool", "check_uid", "durable_write"]

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_LENIENT = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # leading zeros occur in the wild; still safe as a path


class InvalidUIDError(ValueError):
    """A UID that is not a DICOM UID (digits and dots, at most 64 characters) and so cannot name a file."""


def check_uid(value: object, what: str) -> str:
    """``value`` as a UID string, or :class:`InvalidUIDError` naming ``what`` and the offending value."""
    text = str(value or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not _UID_LENIENT.match(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidUIDError(f"{what} is not a valid UID (digits and dots, 1 to 64 characters): {shown!r}")
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, data: bytes | memoryview, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the whole new one, never a part.

    With ``sync`` the data and the directory entry are on stable storage when this returns.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync:
        _fsync_dir(path.parent)


class Spool:
    """Where received instances live; shared with remote workers as a volume in multi-host set-ups."""

    def __init__(self, root: Path, *, sync: bool = True) -> None:
        self.root = root
        self.sync = sync
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """The file of one instance; raises :class:`InvalidUIDError` for anything that is not a UID."""
        study = check_uid(study_uid, "Study Instance UID")
        series = check_uid(series_uid, "Series Instance UID")
        sop = check_uid(sop_instance_uid, "SOP Instance UID")
        return self.root / study / series / f"{sop}.dcm"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise InvalidUIDError(f"spool path escapes the spool: {relative!r}")
        return path

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        with self._lock:
            missing = []
            d = directory
            while not d.exists():
                missing.append(d)
                d = d.parent
            directory.mkdir(parents=True, exist_ok=True)
            if self.sync:
                # A new directory's entry lives in its parent: sync each parent of a created directory.
                for created in reversed(missing):
                    _fsync_dir(created.parent)
            self._known_dirs.add(directory)

    def store(self, path: Path, data: bytes | memoryview) -> int:
        """Durably write one instance's bytes; returns the size written."""
        self._ensure_dir(path.parent)
        durable_write(path, data, sync=self.sync)
        return len(data)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
