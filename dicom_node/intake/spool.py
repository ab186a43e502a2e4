"""The spool: received instances on disk, byte for byte as the peer sent them, written so that none is lost.

Layout: ``<data_dir>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. UIDs from the network
are validated before they become path components, so no peer can write outside the spool.

A write is durable before it returns: temporary file, ``fsync``, atomic ``rename`` into place, ``fsync`` of the
directory (and of any directory it had to create). Received instances are staged in ``<data_dir>/spool/.incoming``
(:meth:`Spool.stage`) before their header is read, and moved into place once it names their study and series
(:meth:`Staged.commit`); the next start removes what a crash left there.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import re
import shutil
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_node.logs import uid_hash

__all__ = [
    "SOURCE_AE_ATTRIBUTE",
    "InvalidUIDError",
    "Spool",
    "Staged",
    "StagingFile",
    "check_uid",
    "durable_write",
    "file_head",
]

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_LENIENT = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # leading zeros occur in the wild; still safe as a path


class InvalidUIDError(ValueError):
    """A UID that is not a DICOM UID (digits and dots, at most 64 characters) and so cannot name a file."""


def check_uid(value: object, what: str) -> str:
    """``value`` as a UID string, or :class:`InvalidUIDError` naming ``what`` and the offending value."""
    text = str(value or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not _UID_LENIENT.match(text):
        # The message reaches logs: the value is shown as its hash (a peer's bad UID can carry anything).
        shown = f"{len(text)} characters, hash {uid_hash(text)}" if text else "empty"
        raise InvalidUIDError(f"{what} is not a valid UID (digits and dots, 1 to 64 characters): {shown}")
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Give a file's pages (``length`` 0: to its end) back to the kernel; on pages still dirty, start their writeback
    without waiting for it.

    After the sync it frees the pages: a spooled instance is read again only by a worker, seconds to minutes later,
    and keeping it cached makes every next write take fresh pages from the kernel, which measured about 7x slower
    than reusing the pages just released (bench/bench_intake.py, variant ``keepcache``). Right after a write it starts
    the disk's work early (:class:`StagingFile`). Advisory: a kernel without it just keeps the pages.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


Buffer = bytes | bytearray | memoryview


def _write_new(tmp: Path, parts: Sequence[Buffer], attributes: dict[str, bytes] | None = None) -> tuple[int, int]:
    """Create ``tmp`` and write ``parts`` in order (and its extended ``attributes``); returns the open descriptor and
    the size. On failure ``tmp`` is removed."""
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        size = _write_all(fd, parts)
        for name, value in (attributes or {}).items():
            os.setxattr(fd, name, value)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd, size


def _write_all(fd: int, parts: Sequence[Buffer]) -> int:
    size = 0
    for part in parts:
        view = memoryview(part).cast("B")
        size += view.nbytes
        while view:
            written = os.write(fd, view)
            view = view[written:]
    return size


def _parts(data: Buffer | Sequence[Buffer]) -> Sequence[Buffer]:
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else data


def durable_write(path: Path, data: Buffer | Sequence[Buffer], *, sync: bool = True) -> None:
    """Write ``data`` (one buffer, or several written in order) to ``path`` atomically: readers see the old file or
    the whole new one, never a part.

    With ``sync`` the data and the directory entry are on stable storage when this returns.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    staged = Staged(tmp, *_write_new(tmp, _parts(data)), sync=sync)
    try:
        staged.commit(path)
    finally:
        staged.discard()


#: Extended attribute of a spooled file naming the calling AE title it came from (the one fact the file lacks).
SOURCE_AE_ATTRIBUTE = "user.dicom_node.calling_ae"


def _supports_xattr(folder: Path) -> bool:
    """Whether files in ``folder`` can carry user extended attributes (ext4, XFS, Btrfs do; some mounts do not)."""
    if not hasattr(os, "setxattr"):
        return False
    probe = folder / f".xattr-probe.{os.getpid()}.{threading.get_ident()}"
    try:
        probe.touch()
        os.setxattr(probe, SOURCE_AE_ATTRIBUTE, b"probe")
        return os.getxattr(probe, SOURCE_AE_ATTRIBUTE) == b"probe"
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


class Staged:
    """An instance written to a temporary file whose writeback has started: not yet synced, not yet in place."""

    def __init__(
        self, tmp: Path, fd: int, size: int, *, sync: bool, make_dir: Callable[[Path], None] | None = None
    ) -> None:
        self.tmp = tmp
        self.size = size
        self._fd: int | None = fd
        self._sync = sync
        self._make_dir = make_dir

    def commit(self, path: Path) -> None:
        """Sync the file and move it to ``path`` durably (file, then directory): after this it survives a crash."""
        fd = self._fd
        assert fd is not None, "staged file already committed or discarded"
        if self._make_dir is not None:
            self._make_dir(path.parent)
        if self._sync:
            os.fsync(fd)
            _drop_cached(fd)
        self._fd = None
        os.close(fd)
        try:
            try:
                os.replace(self.tmp, path)
            except FileNotFoundError:
                if self._make_dir is None or not self.tmp.exists():
                    raise
                # Retention removed the (empty) directory after make_dir saw it: make it again, once.
                self._make_dir(path.parent)
                os.replace(self.tmp, path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        if self._sync:
            _fsync_dir(path.parent)

    def discard(self) -> None:
        """Drop the file unless it was committed; safe to call more than once."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.tmp.unlink(missing_ok=True)

    def mapped(self) -> mmap.mmap:
        """The staged bytes, mapped read-only from the page cache (to read a header without copying the file)."""
        assert self._fd is not None, "staged file already committed or discarded"
        return mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)


class StagingFile:
    """An instance's temporary file in ``.incoming``, written piece by piece: from a whole buffer
    (:meth:`Spool.stage`), or from the network as a large data set arrives, which keeps it out of memory.

    The disk's writeback is started as the pieces come in; :meth:`finish` hands the file over as :class:`Staged`.
    """

    #: Writeback of what was written is started every this many bytes, so that the disk works during the transfer.
    WRITEBACK_EVERY = 256 * 1024

    def __init__(self, spool: Spool, source_ae: str) -> None:
        self._spool = spool
        self.tmp = spool.incoming / f".{os.getpid()}.{threading.get_ident()}.{next(spool._serial)}.tmp"
        attributes = {SOURCE_AE_ATTRIBUTE: source_ae.encode("ascii", "replace")} if spool.carries_source else None
        self._fd: int | None
        self._fd, _ = _write_new(self.tmp, (), attributes)
        self.size = 0
        self._unsynced = 0
        # The network thread writes; the association's thread may discard (an abort) or finish: never at once, so
        # that a descriptor is never written after it was closed (and perhaps reused for another file).
        self._lock = threading.Lock()

    def write(self, data: Buffer) -> None:
        """Append ``data``; an OSError (disk full, I/O error, already discarded) leaves the file for :meth:`discard`."""
        with self._lock:
            if self._fd is None:
                raise OSError(errno.EBADF, "staging file already finished or discarded", str(self.tmp))
            written = _write_all(self._fd, (data,))
            self.size += written
            self._unsynced += written
            if self._spool.sync and self._unsynced >= self.WRITEBACK_EVERY:
                _drop_cached(self._fd, self.size - self._unsynced, self._unsynced)
                self._unsynced = 0

    def finish(self) -> Staged:
        """The complete file, its writeback started, for :meth:`Staged.commit` or :meth:`Staged.discard`."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                raise OSError(errno.EBADF, "staging file already finished or discarded", str(self.tmp))
            if self._spool.sync and self._unsynced:
                _drop_cached(fd, self.size - self._unsynced, self._unsynced)
            return Staged(self.tmp, fd, self.size, sync=self._spool.sync, make_dir=self._spool._ensure_dir)

    def discard(self) -> None:
        """Drop the file (a transfer that failed or was aborted); safe to call more than once."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
                self.tmp.unlink(missing_ok=True)


class Spool:
    """Where received instances live; shared with remote workers as a volume in multi-host set-ups.

    Each file carries the calling AE title it came from as an extended attribute, synced with the file, when the
    file system supports them (``carries_source``): the spool then holds everything the job store records about an
    instance, so the store's intake records can be rebuilt from it after a power loss (``Node.recover_spool``).
    """

    def __init__(self, root: Path, *, sync: bool = True) -> None:
        self.root = root
        self.sync = sync
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        self._root_prefix = str(root) + os.sep
        self.incoming = root / ".incoming"
        self._ensure_dir(self.incoming)
        self._serial = itertools.count()
        self.carries_source = _supports_xattr(root)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """The file of one instance; raises :class:`InvalidUIDError` for anything that is not a UID."""
        study = check_uid(study_uid, "Study Instance UID")
        series = check_uid(series_uid, "Series Instance UID")
        sop = check_uid(sop_instance_uid, "SOP Instance UID")
        return self.root / study / series / f"{sop}.dcm"

    def relative(self, path: Path) -> str:
        # A string prefix for the paths path_for() makes (Path.relative_to took 0.1 ms per instance on the C-STORE
        # path), relative_to for anything else.
        text, prefix = str(path), self._root_prefix
        if text.startswith(prefix):
            return text[len(prefix) :]
        return str(path.relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise InvalidUIDError(f"spool path escapes the spool: {relative!r}")
        return path

    def remove(self, relatives: Sequence[str]) -> None:
        """Delete instances' files (spool-relative paths, as recorded), then their series and study directories
        where those are left empty. A file already gone is no error; any other failure raises before the rest."""
        parents: set[Path] = set()
        for relative in relatives:
            self.resolve(relative)  # InvalidUIDError for a path that leads outside the spool
            path = self.root / relative  # as path_for() makes it, so that the directory cache matches
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for directory in sorted(parents | {p.parent for p in parents}, key=lambda p: len(p.parts), reverse=True):
            if directory == self.root:
                continue
            with self._lock:
                self._known_dirs.discard(directory)
                with contextlib.suppress(OSError):  # not empty: an instance arrived meanwhile, or another series
                    directory.rmdir()

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

    def stage(self, data: Buffer | Sequence[Buffer], source_ae: str = "") -> Staged:
        """Write one instance's bytes (one buffer or its parts in order), with the calling AE title it came from, to
        a temporary file in ``.incoming``, and start writing them to the disk; :meth:`Staged.commit` syncs the file
        and moves it to its place. Meanwhile the caller can read the header that names that place: the disk works
        while the CPU does."""
        staging = self.open_staging(source_ae)
        try:
            for part in _parts(data):
                staging.write(part)
        except BaseException:
            staging.discard()
            raise
        return staging.finish()

    def open_staging(self, source_ae: str = "") -> StagingFile:
        """A temporary file in ``.incoming`` to write an instance into as it arrives (:class:`StagingFile`)."""
        return StagingFile(self, source_ae)

    def store(self, path: Path, data: Buffer | Sequence[Buffer], source_ae: str = "") -> int:
        """Durably write one instance's bytes to ``path`` (:meth:`stage` then commit); returns the size written."""
        staged = self.stage(data, source_ae)
        try:
            staged.commit(path)
        finally:
            staged.discard()
        return staged.size

    def clear_incoming(self) -> int:
        """Remove staged files that were never committed (their senders got no Success); returns how many."""
        stale = list(self.incoming.glob(".*.tmp"))
        for tmp in stale:
            tmp.unlink(missing_ok=True)
        return len(stale)

    def source_ae(self, path: Path) -> str:
        """The calling AE title a spooled file came from; empty when the file system keeps no attributes."""
        try:
            return os.getxattr(path, SOURCE_AE_ATTRIBUTE).decode("ascii", "replace")
        except (OSError, AttributeError):
            return ""

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _short_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in explicit VR little endian with a 2-byte length (UL, UI, SH)."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_head(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) of a received instance.

    The same elements and bytes as pynetdicom's ``Event.file_meta`` written by pydicom, which took 0.2 to 0.5 ms per
    instance on the C-STORE path; a test holds the two equal.
    """

    def padded(text: str, pad: bytes) -> bytes:
        raw = text.encode("ascii")
        return raw + pad if len(raw) % 2 else raw

    elements = b"".join(
        (
            struct.pack("<HH2s2sI", 0x0002, 0x0001, b"OB", b"\0\0", 2) + b"\x00\x01",
            _short_element(0x0002, b"UI", padded(sop_class_uid, b"\0")),
            _short_element(0x0003, b"UI", padded(sop_instance_uid, b"\0")),
            _short_element(0x0010, b"UI", padded(transfer_syntax, b"\0")),
            _short_element(0x0012, b"UI", padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _short_element(0x0013, b"SH", padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    return _PREAMBLE + _short_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


