"""Benchmark: C-STORE intake of 300 CT instances of 512 KB over loopback, against dcmtk, Orthanc and a discard SCP.

The study is synthesised from the corpus CT ``693_UNCI.dcm`` (512 x 512, 16 bit: 512 KB of pixel data) with new
UIDs (one study, one series, 300 instances) into a temporary folder. Each receiver then gets the same files from
dcmtk's ``storescu`` on loopback, in two scenarios:

* ``1x300``: one ``storescu`` with all 300 files (one association);
* ``4x75``: four concurrent ``storescu`` with 75 files each (four associations).

The time is the wall clock from the start of the senders to the exit of the last one. Every receiver starts fresh
(empty storage, free ports) for every run, so that no run sees the previous run's instances as re-sends.
Receivers:

* ``node``: this node, ``python -m dicom_node.cli serve`` in a subprocess, with fsync ON and the SQLite job store
  (the durable path: temp file, fsync, rename, directory fsync, then the record committed; the calling AE rides
  with the file as an extended attribute, so the intake record's commit skips the WAL sync: see
  ``JobStore(intake_rebuildable=...)``; variant ``synced-records`` syncs it as well);
* ``storescp``: dcmtk's ``storescp`` writing files (no fsync; ``--fork`` so that concurrent associations run in
  parallel as they do in the node);
* ``orthanc``: Orthanc with its defaults for storage (``SyncStorageArea`` true: fsync) and a SQLite index;
* ``discard``: a pynetdicom SCP built like the node's (same contexts, PDU size, time-outs, and the node's
  association tuning) whose C-STORE handler answers Success without decoding or writing anything: the upper bound
  of the node's network stack. ``discard-stockrecv`` is the same without the tuning (pynetdicom as shipped),
  ``discard-pollreactor`` without the event-driven waits of the association threads only. ``discard-durable``
  writes each data set durably (temporary file, fsync, rename, directory fsync) and does nothing else: what the
  durability the node must give costs on its own, with no header check and no job store.

All receivers announce the same maximum PDU (131072 bytes, dcmtk's largest), so ``storescu`` sends PDUs of
the same size to each. The median of ``--runs`` runs is reported, with instances/s, MB/s and the ratios of the
node to each baseline. The script exits non-zero only when something failed to transfer (a ``storescu`` exit
code other than 0, or a receiver that does not hold every instance), never on a timing.

Experiments (``--variants``) run the node again with one change each, for attributing its time; they are not
product settings: ``nofsync`` (node.fsync false), ``sqlite-normal`` (PRAGMA synchronous=NORMAL on every
connection), ``nosync`` (both), ``synced-records`` (intake records synced too, as on a spool without extended
attributes), ``stockrecv`` (pynetdicom's own 4096-byte socket reads and polling reactors), ``pollreactor``
(pynetdicom's polling reactors: the association threads sleep 1 ms between looks), ``noquickack`` (no
TCP_QUICKACK after each read: the kernel's delayed acknowledgements), ``keepcache`` (no ``POSIX_FADV_DONTNEED``:
spooled files stay in the page cache, and their writeback is not started before the header is read), ``pdu16k``
(node.max_pdu 16384), ``noheader`` (no C-STORE header read: the handler takes the UIDs from the request only),
``inmemory`` (no data set written to the spool while it arrives), ``spoolall`` (every data set written so),
``postgresql`` (the job store on a local PostgreSQL server that the bench starts, instead of SQLite), ``tls``
(DICOM TLS on intake with peer certificates, ``storescu +tls``; certificates made with openssl for the run).
``--profile DIR`` samples the node with py-spy during one extra run of each scenario and prints
where its time goes.

Run: ``.venv/bin/python -m bench.bench_intake [--runs 3] [--variants nofsync,sqlite-normal] [--profile DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STORESCU = shutil.which("storescu") or "storescu"
STORESCP = shutil.which("storescp") or "storescp"
ORTHANC = Path(os.environ.get("ORTHANC_BINARY", "/usr/sbin/Orthanc"))
MAX_PDU = 131072  # dcmtk's largest; every receiver announces it so that storescu sends PDUs of one size
SCENARIOS = {"1x300": 1, "4x75": 4}
START_TIMEOUT = 60.0
RUN_TIMEOUT = 600.0


# --- data ---------------------------------------------------------------------------------------------------------


def synthesise(folder: Path, count: int) -> list[Path]:
    """``count`` CT instances of one study and one series, each with 512 x 512 x 16 bit (512 KB) of pixel data."""
    from tests.corpus import corpus_file

    src = pydicom.dcmread(corpus_file("693_UNCI.dcm"))
    rows, cols = int(src.Rows), int(src.Columns)
    pixels = src.pixel_array
    if (rows, cols) != (512, 512) or int(src.BitsAllocated) != 16:
        import numpy as np

        pixels = np.pad(pixels, ((0, max(0, 512 - rows)), (0, max(0, 512 - cols))), mode="edge")[:512, :512]
        src.Rows, src.Columns, src.BitsAllocated, src.BitsStored, src.HighBit = 512, 512, 16, 16, 15
    src.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    if len(src.PixelData) != 512 * 512 * 2:
        raise RuntimeError(f"synthesised Pixel Data must be 524288 bytes, got {len(src.PixelData)}")
    src.PatientName = "BENCH^INTAKE"
    src.PatientID = "BENCH-INTAKE"
    src.StudyInstanceUID = generate_uid(entropy_srcs=["bench-intake", "study"])
    src.SeriesInstanceUID = generate_uid(entropy_srcs=["bench-intake", "series"])
    src.StudyDescription = "intake benchmark"
    src.SeriesDescription = "synthetic CT"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        uid = generate_uid(entropy_srcs=["bench-intake", "instance", str(i)])
        src.SOPInstanceUID = uid
        src.file_meta.MediaStorageSOPInstanceUID = uid
        src.InstanceNumber = i + 1
        src.ImagePositionPatient = [0.0, 0.0, float(i)]
        path = folder / f"ct{i:04d}.dcm"
        src.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, what: str, log: Path | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {START_TIMEOUT:g} s:\n{tail(log)}")


def tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    """SIGTERM to the process group the receiver runs in (its own session), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


# --- receivers ----------------------------------------------------------------------------------------------------


class Receiver:
    """A C-STORE receiver started fresh in ``workdir`` for one run."""

    name = "receiver"
    aet = "RECEIVER"
    #: storescu options this receiver needs (TLS).
    sender_args: tuple[str, ...] = ()

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO, env=self.env(), start_new_session=True,
            )
        wait_for_port(self.port, self.proc, self.name, self.log)

    def stop(self) -> None:
        stop_process(self.proc)

    def count(self) -> int:
        """Instances the receiver holds after the run."""
        raise NotImplementedError

    def handler_ms(self) -> float | None:
        """Milliseconds per instance its C-STORE handler took, where the receiver reports it."""
        return None


class NodeReceiver(Receiver):
    """This node, as ``dicom-node serve`` runs it, with a variant's configuration overrides and patches."""

    aet = "AINODE"

    def __init__(self, workdir: Path, variant: str = "") -> None:
        self.variant = variant
        self.name = f"node-{variant}" if variant else "node"
        super().__init__(workdir)
        self.data_dir = workdir / "data"
        node: dict[str, Any] = {
            "ae_title": self.aet, "port": self.port, "bind": "127.0.0.1", "data_dir": str(self.data_dir),
            "max_associations": 16, "max_pdu": MAX_PDU, "fsync": True, "metrics_port": free_port(),
        }
        self.metrics_port = node["metrics_port"]
        patches = VARIANTS[variant][1] if variant else []
        node.update(VARIANTS[variant][0] if variant else {})
        config = {
            "node": node,
            "study": {"stable_seconds": 30, "max_wait_seconds": 3600},
            "queue": {"broker_url": "embedded", "start_workers": False},
            "model": {"family": "demo", "path": None},
            "destinations": [],
            "rules": [{"name": "all-images"}],
            "logging": {"level": "WARNING"},
        }
        if variant == "tls":  # DICOM TLS, mutual: the node and storescu present certificates of one test CA
            from tests.pki import make_pki

            pki = make_pki(Path(tempfile.mkdtemp(prefix="pki-", dir=workdir)))
            node.update(tls_cert_file=str(pki / "node.pem"), tls_key_file=str(pki / "node.key"),
                        tls_ca_file=str(pki / "ca.pem"))
            self.sender_args = ("+tls", str(pki / "pacs.key"), str(pki / "pacs.pem"), "+cf", str(pki / "ca.pem"))
        self.store_url = _postgres_url() if variant == "postgresql" else None
        if self.store_url is not None:
            config["store"] = {"url": self.store_url}
        self.config = workdir / "node.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
        self.patches = patches

    def command(self) -> list[str]:
        if self.patches:
            return [PYTHON, "-m", "bench.bench_intake", "_node", "--config", str(self.config),
                    "--patches", ",".join(self.patches)]
        return [PYTHON, "-m", "dicom_node.cli", "serve", "--config", str(self.config)]

    def handler_ms(self) -> float | None:
        """From the node's own metric ``dicom_node_cstore_handler_seconds`` (sum and count)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
        except OSError:
            return None
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("dicom_node_cstore_handler_seconds_sum", "dicom_node_cstore_handler_seconds_count"):
                values[name.rsplit("_", 1)[1]] = float(value)
        return 1000 * values["sum"] / values["count"] if values.get("count") else None

    def count(self) -> int:
        files = sum(1 for _ in (self.data_dir / "spool").glob("*/*/*.dcm"))
        if self.store_url is not None:
            from dicom_node.jobs.store import JobStore

            store = JobStore(self.store_url)
            recorded = store.counts()["instances"]
            store.close()
        else:
            with contextlib.closing(sqlite3.connect(self.data_dir / "jobs.sqlite")) as db:
                recorded = int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
        return min(files, recorded)


class StorescpReceiver(Receiver):
    name = "storescp"
    aet = "STORESCP"

    def command(self) -> list[str]:
        (self.workdir / "out").mkdir(parents=True, exist_ok=True)
        return [STORESCP, "--fork", "-aet", self.aet, "-pdu", str(MAX_PDU), "-od", str(self.workdir / "out"),
                str(self.port)]

    def count(self) -> int:
        return sum(1 for p in (self.workdir / "out").iterdir() if p.is_file())


class OrthancReceiver(Receiver):
    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.http_port = free_port()
        storage = workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bench-intake",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "SyncStorageArea": True,  # Orthanc's default since 1.7.4: fsync each file
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "MaximumPduLength": MAX_PDU,
            "StableAge": 3600,
            "SaveJobs": False,
        }
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def command(self) -> list[str]:
        return [str(ORTHANC), f"--logfile={self.workdir / 'orthanc-internal.log'}", str(self.config)]

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/statistics", timeout=30) as rsp:
            return int(json.load(rsp)["CountInstances"])


class DiscardReceiver(Receiver):
    """A pynetdicom SCP like the node's (same AE settings) that answers Success and keeps nothing."""

    aet = "DISCARD"

    def __init__(self, workdir: Path, patches: Sequence[str] = ()) -> None:
        self.name = "-".join(["discard", *patches])
        self.patches = list(patches)
        super().__init__(workdir)

    def command(self) -> list[str]:
        return [PYTHON, "-m", "bench.bench_intake", "_discard", "--port", str(self.port),
                "--count-file", str(self.workdir / "count"), "--patches", ",".join(self.patches)]

    def count(self) -> int:
        self.stop()  # the server writes its count when it stops
        try:
            return int((self.workdir / "count").read_text())
        except (OSError, ValueError):
            return 0


# --- node variants and server entry points (run in the receiver subprocess) -----------------------------------


def _patch_sqlite_normal() -> None:
    """PRAGMA synchronous=NORMAL: in WAL mode a commit no longer waits for an fsync of the WAL."""
    from dicom_node.jobs import store

    original = store._sqlite_pragmas

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        original(dbapi_conn, _record)
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    store._sqlite_pragmas = pragmas


def _patch_noheader() -> None:
    """The C-STORE handler reads no data set header: UIDs come from the request (study and series fixed)."""
    from dicom_node.intake import handlers
    from dicom_node.intake.header import Header

    study = generate_uid(entropy_srcs=["bench-intake", "study"])
    series = generate_uid(entropy_srcs=["bench-intake", "series"])
    original = handlers.Intake._admit

    def admit(self: Any, event: Any, calling: str, sop_uid: str, staged: Any, body: Any) -> int:
        values = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop_uid}
        setattr(handlers, "read_header", lambda data, syntax: Header(values, None))  # noqa: B010
        return int(original(self, event, calling, sop_uid, staged, body))

    setattr(handlers.Intake, "_admit", admit)  # noqa: B010


def _patch_stockrecv() -> None:
    """The node without its association tuning: pynetdicom's own socket reads (4096 bytes per ``recv``) and its
    polling reactor threads."""
    from dicom_node.intake import server

    setattr(server, "tune_association", lambda assoc, guard=None: None)  # noqa: B010


def _patch_pollreactor() -> None:
    """pynetdicom's polling reactor threads (1 ms sleeps) instead of the node's event-driven waits."""
    from dicom_node.intake import server

    setattr(server, "make_event_driven", lambda assoc: None)  # noqa: B010


def _patch_noquickack() -> None:
    """Delayed TCP acknowledgements, as the kernel has them (no TCP_QUICKACK after each read)."""
    from dicom_node.intake import transport

    setattr(transport, "_QUICKACK", None)  # noqa: B010


def _patch_synced_records() -> None:
    """Every intake record's commit waits for a WAL sync, as on a spool without extended attributes."""
    from dicom_node.intake import spool

    setattr(spool, "_supports_xattr", lambda folder: False)  # noqa: B010


def _patch_keepcache() -> None:
    """No ``POSIX_FADV_DONTNEED``: no early writeback while the header is read, and the pages stay cached."""
    from dicom_node.intake import spool

    setattr(spool, "_drop_cached", lambda fd, offset=0, length=0: None)  # noqa: B010


def _patch_inmemory() -> None:
    """Every data set held in memory until its last byte, as pynetdicom does by default (no spooling on arrival)."""
    from dicom_node.intake import transport

    setattr(transport._SpooledDataSet, "SPOOL_ABOVE", sys.maxsize)  # noqa: B010


def _patch_spoolall() -> None:
    """Every C-STORE data set written to the spool as it arrives, whatever its size."""
    from dicom_node.intake import transport

    setattr(transport._SpooledDataSet, "SPOOL_ABOVE", 0)  # noqa: B010


PATCHES: dict[str, Callable[[], None]] = {
    "inmemory": _patch_inmemory,
    "spoolall": _patch_spoolall,
    "sqlite-normal": _patch_sqlite_normal,
    "noheader": _patch_noheader,
    "stockrecv": _patch_stockrecv,
    "pollreactor": _patch_pollreactor,
    "noquickack": _patch_noquickack,
    "keepcache": _patch_keepcache,
    "synced-records": _patch_synced_records,
}

#: name -> (node settings overrides, patches)
VARIANTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "nofsync": ({"fsync": False}, []),
    "sqlite-normal": ({}, ["sqlite-normal"]),
    "nosync": ({"fsync": False}, ["sqlite-normal"]),
    "pdu16k": ({"max_pdu": 16384}, []),
    "noheader": ({}, ["noheader"]),
    "stockrecv": ({}, ["stockrecv"]),
    "pollreactor": ({}, ["pollreactor"]),
    "noquickack": ({}, ["noquickack"]),
    "keepcache": ({}, ["keepcache"]),
    "synced-records": ({}, ["synced-records"]),
    "inmemory": ({}, ["inmemory"]),
    "spoolall": ({}, ["spoolall"]),
    "postgresql": ({}, []),  # the job store on a local PostgreSQL server (started by the bench) instead of SQLite
    "tls": ({}, []),  # DICOM TLS with peer certificates; storescu with +tls (certificates made for the run)
}
_POSTGRES: list[Any] = []  # the bench's PostgreSQL server, started at the first run of variant postgresql


def _postgres_url() -> str:
    """An empty database on the bench's own PostgreSQL server (Debian's postgresql, as ``make test`` installs)."""
    if not _POSTGRES:
        from tests.postgres import PostgresServer, postgres_bin

        bindir = postgres_bin()
        if bindir is None:
            raise SystemExit("variant postgresql needs PostgreSQL (Debian package postgresql)")
        _POSTGRES.append(PostgresServer(bindir).start())
    url: str = _POSTGRES[0].new_database()
    return url


def _serve_node(config: str, patches: list[str]) -> None:
    for name in patches:
        PATCHES[name]()
    from dicom_node.cli import app

    app(["serve", "--config", config])


#: Not a patch of the node: ``discard-durable`` writes each data set as any receiver must before it answers
#: Success (temporary file, fsync, rename, directory fsync), through the node's own spool code, and does
#: nothing else: no header read, no job store. It is the floor that durability alone sets under the node.
DURABLE = "durable"


def _serve_discard(port: int, count_file: Path, patches: list[str]) -> None:
    for name in patches:
        if name != DURABLE:
            PATCHES[name]()
    from pynetdicom import evt

    from dicom_node.config import NodeSettings
    from dicom_node.intake.server import build_ae, tune_association
    from dicom_node.intake.spool import Spool, file_head

    ae = build_ae(NodeSettings(ae_title=DiscardReceiver.aet, max_pdu=MAX_PDU, max_associations=16))
    lock = threading.Lock()
    received = [0]
    spool = Spool(count_file.parent / "spool")

    def on_store(event: Any) -> int:
        if DURABLE in patches:  # the node's own staging and commit: writeback started at once, then the syncs
            request = event.request
            sop_uid = str(request.AffectedSOPInstanceUID)
            head = file_head(str(request.AffectedSOPClassUID), sop_uid, str(event.context.transfer_syntax))
            with request.DataSet.getbuffer() as body:
                staged = spool.stage((head, body), source_ae=event.assoc.requestor.ae_title.strip())
            try:
                staged.commit(spool.path_for("1.2.3", "1.2.3.4", sop_uid))
            finally:
                staged.discard()
        with lock:
            received[0] += 1
        return 0x0000

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    handlers: list[Any] = [
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_CONN_OPEN, lambda event: tune_association(event.assoc)),  # the node's network tuning
    ]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    stop.wait()
    assert server is not None
    server.shutdown()
    count_file.write_text(str(received[0]))


# --- senders and runs ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    receiver: str
    scenario: str
    seconds: float
    ok: bool
    load: float
    fsync_ms: float
    problem: str = ""
    handler_ms: float | None = None
    cpu_receiver_ms: float | None = None  # CPU time of the receiver's process tree per instance
    cpu_machine_ms: float | None = None  # busy CPU time of the whole machine (both cores, kernel too) per instance


_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the machine has been busy (all cores; user, system and interrupts, not steal), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4] + fields[7]  # idle, iowait, steal (time the host gave to others)
    return (sum(fields[:8]) - idle) / _TICK


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its reaped children (utime, stime, cutime, cstime), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / _TICK


def disk_probe(folder: Path, count: int = 10) -> float:
    """Median milliseconds to write 512 KB, fsync it and fsync its folder: the disk's state at the time of a run."""
    data = os.urandom(512 * 1024)
    times = []
    for i in range(count):
        path = folder / f".probe{i}"
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        times.append(time.perf_counter() - t0)
        path.unlink()
    return 1000 * statistics.median(times)


def send(
    files: Sequence[Path], senders: int, aet: str, port: int, workdir: Path, options: Sequence[str] = ()
) -> tuple[float, list[str]]:
    """Start ``senders`` storescu processes on disjoint shares of ``files``; returns wall seconds and problems."""
    shares = [list(files[i::senders]) for i in range(senders)]
    logs = [workdir / f"storescu-{i}.log" for i in range(senders)]
    procs = []
    start = time.perf_counter()
    for share, log in zip(shares, logs, strict=True):
        with log.open("wb") as out:
            procs.append(subprocess.Popen(
                [STORESCU, *options, "-aet", "BENCHSCU", "-aec", aet, "127.0.0.1", str(port), *map(str, share)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            ))
    problems = []
    for proc, log in zip(procs, logs, strict=True):
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0:
            problems.append(f"storescu exited with code {code}:\n{tail(log, 10)}")
    return time.perf_counter() - start, problems


def make_receiver(name: str, workdir: Path) -> Receiver:
    if name == "node":
        return NodeReceiver(workdir)
    if name.startswith("node-"):
        return NodeReceiver(workdir, name.removeprefix("node-"))
    if name.startswith("discard-"):
        return DiscardReceiver(workdir, [name.removeprefix("discard-")])
    return {"storescp": StorescpReceiver, "orthanc": OrthancReceiver, "discard": DiscardReceiver}[name](workdir)


def one_run(name: str, scenario: str, files: Sequence[Path], root: Path, profile: Path | None = None) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{scenario}-", dir=root))
    fsync_ms = disk_probe(workdir)
    receiver = make_receiver(name, workdir)
    receiver.start()
    spy: subprocess.Popen[bytes] | None = None
    try:
        if profile is not None:
            assert receiver.proc is not None
            spy = start_profiler(receiver.proc.pid, profile)
        load = os.getloadavg()[0]
        assert receiver.proc is not None
        cpu_before = process_cpu_seconds(receiver.proc.pid), machine_busy_seconds()
        seconds, problems = send(files, SCENARIOS[scenario], receiver.aet, receiver.port, workdir,
                                 receiver.sender_args)
        cpu_receiver = 1000 * (process_cpu_seconds(receiver.proc.pid) - cpu_before[0]) / len(files)
        cpu_machine = 1000 * (machine_busy_seconds() - cpu_before[1]) / len(files)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        handler_ms = receiver.handler_ms()
        held = receiver.count()
        if held != len(files):
            problems.append(f"{name} holds {held} instances, {len(files)} were sent:\n{tail(receiver.log, 10)}")
    finally:
        receiver.stop()
        if spy is not None and spy.poll() is None:
            spy.kill()
    if not problems:
        shutil.rmtree(workdir, ignore_errors=True)
    return Run(name, scenario, seconds, not problems, load, fsync_ms, "\n".join(problems), handler_ms,
               cpu_receiver, cpu_machine)


# --- profiling ----------------------------------------------------------------------------------------------------


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy", path=f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if spy is None:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking",
         "--threads"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attach before the senders start
    return proc


#: (label, substring of a frame "function (file:line)"); the first matching from the leaf up names a sample.
CATEGORIES = [
    (
        "spool: durable_write (write, fsync, rename, dir fsync)",
        ("durable_write (dicom_node/intake/spool.py", "_fsync_dir"),
    ),
    ("spool: write/rename/mkdir", ("Spool.store", "Spool._ensure_dir", "store (dicom_node/intake/spool.py")),
    ("job store: record_instance (SQLite commit)", ("record_instance",)),
    ("job store: known_instance", ("known_instance",)),
    ("handler: file meta", ("file_head", "_short_element")),
    ("handler: header read", ("dicom_node/intake/header.py",)),
    ("handler: other", ("_store (dicom_node/intake/handlers.py", "on_c_store")),
    ("DIMSE: message decode/assembly", ("dimse_messages.py", "dimse.py")),
    ("DUL/PDU: socket read and PDU decode", ("dul.py", "pdu.py", "transport.py", "pdu_primitives.py")),
    ("association reactor / events", ("association.py", "events.py")),
]


def summarise_profile(raw: Path) -> list[tuple[str, float]]:
    """Share of the node's non-idle samples per category (first match from the leaf up)."""
    totals: Counter[str] = Counter()
    all_samples = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        all_samples += count
        frames = stack.split(";")
        label = "other (threads, logging, interpreter)"
        for frame in reversed(frames):
            hit = next((lab for lab, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit is not None:
                label = hit
                break
        totals[label] += count
    return [(label, 100.0 * n / all_samples) for label, n in totals.most_common()] if all_samples else []


def top_leaves(raw: Path, n: int = 12) -> list[tuple[str, float]]:
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        leaves[stack.split(";")[-1]] += int(count_text)
        total += int(count_text)
    return [(leaf, 100.0 * c / total) for leaf, c in leaves.most_common(n)] if total else []


# --- handler breakdown (in-process, no network) -------------------------------------------------------------------


STEPS = (
    "header read (read_header + checks)",
    "known_instance (re-send or own result)",
    "file meta (preamble + File Meta)",
    "spool.store (write, fsync, rename, dir fsync)",
    "record_instance (SQLite, synchronous=FULL)",
)


def handler_breakdown(files: Sequence[Path], root: Path, threads: int = 1) -> dict[str, float]:
    """Milliseconds per instance of each step of the node's C-STORE handler, with its own Spool and JobStore.

    The steps are the ones ``dicom_node.intake.handlers.Intake._store`` takes, called directly on the bytes storescu
    would send (the data set without file meta), fsync on. With ``threads`` > 1 the files are stored by that many
    threads at once (as concurrent associations do) and only the wall time per instance is meaningful.
    """
    from io import BytesIO

    from pydicom.filereader import read_preamble

    from dicom_node.intake.header import read_header
    from dicom_node.intake.spool import Spool, file_head
    from dicom_node.jobs.schema import InstanceRecord
    from dicom_node.jobs.store import JobStore

    work = Path(tempfile.mkdtemp(prefix="breakdown-", dir=root))
    spool = Spool(work / "spool", sync=True)
    store = JobStore(f"sqlite:///{work / 'jobs.sqlite'}")
    payloads = []
    for path in files:
        raw = path.read_bytes()
        with BytesIO(raw) as fp:
            read_preamble(fp, False)
            meta = pydicom.filereader._read_file_meta_info(fp)
            payloads.append((meta, raw[fp.tell():]))
    steps: dict[str, float] = dict.fromkeys(STEPS, 0.0)
    lock = threading.Lock()

    def one(meta: Any, body: bytes) -> None:
        t0 = time.perf_counter()
        header = read_header(body, str(meta.TransferSyntaxUID))
        expected = header.native_pixel_bytes()
        assert expected is not None and header.pixel_length is not None and header.pixel_length >= expected
        t1 = time.perf_counter()
        sop = str(header.get("SOPInstanceUID"))
        assert not store.known_instance(sop)
        t2 = time.perf_counter()
        data = (file_head(str(meta.MediaStorageSOPClassUID), sop, str(meta.TransferSyntaxUID)), body)
        t3 = time.perf_counter()
        target = spool.path_for(str(header.get("StudyInstanceUID")), str(header.get("SeriesInstanceUID")), sop)
        size = spool.store(target, data)
        t4 = time.perf_counter()
        store.record_instance(InstanceRecord(
            sop_instance_uid=sop, study_uid=str(header.get("StudyInstanceUID")),
            series_uid=str(header.get("SeriesInstanceUID")), sop_class_uid=str(header.get("SOPClassUID")),
            transfer_syntax=str(meta.TransferSyntaxUID), modality="CT", body_part="", study_description="",
            series_description="", calling_ae="BENCHSCU", path=spool.relative(target), size=size,
        ))
        t5 = time.perf_counter()
        with lock:
            for label, took in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                steps[label] += took

    start = time.perf_counter()
    if threads == 1:
        for meta, body in payloads:
            one(meta, body)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: one(*p), payloads))
    wall = time.perf_counter() - start
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    out = {k: 1000 * v / len(files) for k, v in steps.items()}
    out["wall per instance"] = 1000 * wall / len(files)
    return out


# --- report -------------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    runs: list[Run] = field(default_factory=list)

    def median(self, receiver: str, scenario: str) -> float | None:
        times = [r.seconds for r in self.runs if r.receiver == receiver and r.scenario == scenario and r.ok]
        return statistics.median(times) if times else None


def print_report(figures: Figures, receivers: Sequence[str], count: int, total_bytes: int) -> None:
    print(f"\n{count} instances, {total_bytes / 1e6:.1f} MB per run; median of the successful runs")
    print(f"{'receiver':<26}{'scenario':<9}{'median s':>9}{'inst/s':>9}{'MB/s':>8}{'min..max s':>15}{'load':>7}"
          f"{'fsync ms':>9}{'handler ms':>11}{'cpu ms rcv/all':>16}")
    for receiver in receivers:
        for scenario in SCENARIOS:
            runs = [r for r in figures.runs if r.receiver == receiver and r.scenario == scenario and r.ok]
            med = figures.median(receiver, scenario)
            if med is None:
                print(f"{receiver:<26}{scenario:<9}{'failed':>9}")
                continue
            spread = f"{min(r.seconds for r in runs):.2f}..{max(r.seconds for r in runs):.2f}"
            load = statistics.mean(r.load for r in runs)
            disk = statistics.median(r.fsync_ms for r in runs)
            handler = [r.handler_ms for r in runs if r.handler_ms is not None]
            shown = f"{statistics.median(handler):>11.2f}" if handler else f"{'-':>11}"
            cpu = [(r.cpu_receiver_ms, r.cpu_machine_ms) for r in runs if r.cpu_machine_ms is not None]
            cpu_shown = f"{statistics.median(c[0] for c in cpu):.2f}/{statistics.median(c[1] for c in cpu):.2f}"
            print(f"{receiver:<26}{scenario:<9}{med:>9.2f}{count / med:>9.1f}{total_bytes / 1e6 / med:>8.1f}"
                  f"{spread:>15}{load:>7.2f}{disk:>9.1f}{shown}{cpu_shown:>16}")
    print("\nratios of throughput (node / baseline; > 1 means the node is faster)")
    bases = [r for r in receivers if not r.startswith("node")]
    for node in [r for r in receivers if r.startswith("node")]:
        for base in bases if node == "node" else [b for b in bases if b.startswith("discard")] + ["node"]:
            cells = []
            for scenario in SCENARIOS:
                a, b = figures.median(node, scenario), figures.median(base, scenario)
                cells.append(f"{scenario} {b / a:5.2f}x" if a and b else f"{scenario}   n/a")
            print(f"  {node + '/' + base:<44}" + "   ".join(cells))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="runs per receiver and scenario (median reported)")
    parser.add_argument("--count", type=int, default=300, help="instances per run")
    parser.add_argument("--receivers", default="node,storescp,orthanc,discard,discard-durable", help="comma-separated")
    parser.add_argument("--variants", default="", help=f"node experiments, comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--profile", type=Path, default=None, help="folder for py-spy profiles of the node")
    parser.add_argument("--breakdown", action="store_true", help="also time each handler step in-process")
    parser.add_argument("--json", type=Path, default=None, help="also write every run to this JSON file")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:  # run as a script (make bench): the corpus helper lives in tests/
        sys.path.insert(0, str(REPO))

    receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    receivers += [f"node-{v.strip()}" for v in args.variants.split(",") if v.strip()]
    for r in receivers:
        known = r in ("node", "storescp", "orthanc", "discard") or r.removeprefix("node-") in VARIANTS
        if not known and r.removeprefix("discard-") not in [*PATCHES, DURABLE]:
            parser.error(f"--receivers/--variants: unknown receiver {r!r}")
    if "orthanc" in receivers and not ORTHANC.exists():
        parser.error(f"--receivers: orthanc needs {ORTHANC} (Debian package orthanc)")

    root = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    figures = Figures()
    failures = 0
    try:
        files = synthesise(root / "study", args.count)
        total = sum(p.stat().st_size for p in files)
        print(f"cpus {os.cpu_count()}; load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"{args.count} files of {total / args.count / 1024:.0f} KiB in {root}")
        for run in range(args.runs):
            for scenario in SCENARIOS:
                for name in receivers:  # interleaved, so that a change of load hits every receiver alike
                    result = one_run(name, scenario, files, root)
                    figures.runs.append(result)
                    status = "ok" if result.ok else "FAILED"
                    handler = "" if result.handler_ms is None else f"handler {result.handler_ms:.2f} ms/inst  "
                    handler += f"cpu {result.cpu_receiver_ms:.2f}/{result.cpu_machine_ms:.2f} ms/inst  "
                    print(f"run {run + 1} {scenario:<6} {name:<26} {result.seconds:7.2f} s "
                          f"{args.count / result.seconds:7.1f} inst/s  load {result.load:.2f}  "
                          f"disk {result.fsync_ms:.1f} ms/fsync  {handler}{status}", flush=True)
                    if not result.ok:
                        failures += 1
                        print(result.problem, file=sys.stderr)
        print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print_report(figures, receivers, args.count, total)
        if args.breakdown:
            for threads in (1, 4):
                steps = handler_breakdown(files, root, threads)
                print(f"\nC-STORE handler steps in-process, {threads} thread(s), ms per instance (sum over threads)")
                for label, ms in steps.items():
                    print(f"  {ms:7.2f}  {label}")
                print(f"  => {1000 / steps['wall per instance']:.0f} inst/s for the handler alone")
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for scenario in SCENARIOS:
                raw = args.profile / f"node-{scenario}.txt"
                result = one_run("node", scenario, files, root, profile=raw)
                print(f"\nprofile of node, {scenario} ({result.seconds:.2f} s, {args.count / result.seconds:.1f} "
                      f"inst/s under py-spy), share of non-idle samples of all threads; raw stacks in {raw}")
                for label, share in summarise_profile(raw):
                    print(f"  {share:5.1f}%  {label}")
                print("  top leaf frames:")
                for leaf, share in top_leaves(raw):
                    print(f"  {share:5.1f}%  {leaf}")
        if args.json is not None:
            args.json.write_text(json.dumps([r.__dict__ for r in figures.runs], indent=1), encoding="utf-8")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for server in _POSTGRES:
            server.stop()
    if failures:
        print(f"{failures} run(s) failed to transfer every instance", file=sys.stderr)
        return 1
    return 0


def _entry() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_node":
        p = argparse.ArgumentParser()
        p.add_argument("--config", required=True)
        p.add_argument("--patches", default="")
        a = p.parse_args(sys.argv[2:])
        _serve_node(a.config, [x for x in a.patches.split(",") if x])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_discard":
        p = argparse.ArgumentParser()
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--count-file", type=Path, required=True)
        p.add_argument("--patches", default="")
        a = p.parse_args(sys.argv[2:])
        _serve_discard(a.port, a.count_file, [x for x in a.patches.split(",") if x])
        return 0
    return main()


if __name__ == "__main__":
    sys.exit(_entry())
