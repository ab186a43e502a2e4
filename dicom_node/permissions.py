"""Who may read the node's files: the node's own user, and its group read-only; other local users nothing.

File names under ``data_dir`` are UIDs (spool, broker messages, outbox) and its files hold images, job records and
the audit trail, so nothing there is for other users. Two layers:

* the process umask, :data:`UMASK` (027), set once at process start by the command line (:func:`dicom_node.cli.main`,
  the process boundary of ``serve``, ``worker``, ``demo`` and the workers that ``serve`` starts, which inherit it):
  everything a process creates without a mode of its own (folders made by other modules, files written by
  SQLite, kombu or highdicom) gets at most 0750 for folders and 0640 for files;
* explicit modes where the node creates its folders and files (:func:`private_dir`, :func:`private_file`,
  :func:`open_private`), so that they are private even in a process whose umask is laxer (a library user, the
  in-process node of the tests).

Existing folders and files keep their modes (``data_dir`` may be a path an administrator chose); a ``data_dir``
open to other users is reported at start-up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "UMASK",
    "open_private",
    "private_data_dir",
    "private_dir",
    "private_file",
    "restrict_umask",
]

log = logging.getLogger(__name__)

#: No write for the group, nothing for others.
UMASK = 0o027
DIR_MODE = 0o750
FILE_MODE = 0o640


def restrict_umask() -> int:
    """Set the process umask to :data:`UMASK`; returns the previous one. Call once, at process start."""
    return os.umask(UMASK)


def private_dir(path: Path) -> Path:
    """``mkdir -p`` with mode :data:`DIR_MODE` for every folder it creates (the parents too); existing folders are
    left as they are. Raises ``FileExistsError`` when ``path`` exists and is not a folder, as ``Path.mkdir`` does."""
    missing: list[Path] = []
    current = path
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    return path


def private_data_dir(path: Path) -> Path:
    """:func:`private_dir` for the node's ``data_dir``, with a WARNING when an existing one is open to others."""
    private_dir(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:
        log.warning(
            "data_dir %s has mode %03o: other local users can list and read what it holds (file names are UIDs); "
            "`chmod o-rwx` it",
            path, mode,
        )
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode :data:`FILE_MODE` unless it exists (an existing file is left untouched), so
    that whoever writes it next (SQLite, a log handler) keeps that mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:  # not opened at all: a read-only user of an existing file is not refused here
        pass
    return path


def open_private(path: Path) -> BinaryIO:
    """``open(path, "ab")``, creating the file with mode :data:`FILE_MODE`."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE), "ab")
