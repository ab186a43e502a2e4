"""What a hostile or broken peer costs the node: memory under inflated PDU lengths, and how long a good sender
waits while slow half-open connections are open.

Runs the node as ``dicom-node serve`` (a subprocess, embedded queue, no workers) and measures from outside:

* ``pdu-claims``: the node's resident memory (``VmRSS``, sampled every 20 ms) while three connections each send a
  PDU header claiming 1 GiB and one established association a P-DATA-TF header claiming 2 GiB, all held open for
  2 s. Baseline: the same node idle, just before.
* ``half-open``: 17 connections that send 20 bytes of an A-ASSOCIATE-RQ and then nothing, with
  ``acse_timeout`` 5 s and ``max_associations`` 16; then a good sender (dcmtk ``echoscu``) tries once a
  second until it succeeds. Once with the slow connections from another address (127.0.0.2) and once from the
  good sender's own (127.0.0.1). Baseline: ``echoscu`` against the idle node.

Not a test: it prints figures and ratios, and fails only when it cannot run.

    .venv/bin/python -m bench.bench_hostile
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_intake import PYTHON, REPO, free_port, stop_process, wait_for_port

ACSE_TIMEOUT = 5.0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _associate_rq(called: bytes = b"AINODE") -> bytes:
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    context = bytes((1, 0, 0, 0)) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2")
    body = (
        struct.pack(">HH", 1, 0) + called.ljust(16) + b"BENCH".ljust(16) + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, context) + item(0x50, item(0x51, struct.pack(">I", 16384)))
    )
    return struct.pack(">BBI", 1, 0, len(body)) + body


class Node:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        config = {
            "node": {
                "ae_title": "AINODE", "port": self.port, "bind": "127.0.0.1", "data_dir": str(workdir / "data"),
                "acse_timeout": ACSE_TIMEOUT, "max_associations": 16,
            },
            "queue": {"broker_url": "embedded", "start_workers": False},
            "rules": [{"name": "all-images"}],
            "logging": {"level": "WARNING"},
        }
        path = workdir / "node.yaml"
        path.write_text(json.dumps(config), encoding="utf-8")
        self.log = workdir / "node.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "dicom_node.cli", "serve", "--config", str(path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
            )
        wait_for_port(self.port, self.proc, "node", self.log)
        time.sleep(1.0)  # settle after start-up

    def stop(self) -> None:
        stop_process(self.proc)


def _echo(port: int) -> tuple[bool, float]:
    began = time.monotonic()
    done = subprocess.run(["echoscu", "-to", "10", "-aec", "AINODE", "127.0.0.1", str(port)], capture_output=True)
    return done.returncode == 0, time.monotonic() - began


def pdu_claims(node: Node) -> None:
    idle = _rss_mb(node.proc.pid)
    peak = [idle]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                peak[0] = max(peak[0], _rss_mb(node.proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    socks = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", node.port))
            sock.sendall(struct.pack(">BBI", 1, 0, 1 << 30) + b"\x00\x01\x00\x00")
            socks.append(sock)
        sock = socket.create_connection(("127.0.0.1", node.port))
        sock.sendall(_associate_rq())
        sock.recv(65536)
        sock.sendall(struct.pack(">BBI", 4, 0, (2 << 30) - 1) + bytes(4))
        socks.append(sock)
        time.sleep(2.0)
    finally:
        stop.set()
        sampler.join()
        for sock in socks:
            sock.close()
    print("pdu-claims: 3 x 1 GiB A-ASSOCIATE-RQ headers + 1 x 2 GiB P-DATA-TF header, held 2 s")
    print(f"  node RSS idle (baseline)   {idle:8.1f} MB")
    print(f"  node RSS peak under claims {peak[0]:8.1f} MB   above idle: {peak[0] - idle:6.1f} MB   "
          f"ratio peak/idle: {peak[0] / idle:.2f}x")


def half_open(node: Node, attacker: str) -> None:
    baseline_ok, baseline = _echo(node.port)
    slow = []
    began = time.monotonic()
    for _ in range(17):
        try:
            sock = socket.create_connection(("127.0.0.1", node.port), source_address=(attacker, 0))
            sock.sendall(_associate_rq()[:20])
            slow.append(sock)
        except OSError:
            pass
    opened = time.monotonic() - began
    began = time.monotonic()
    tries, waited = 0, 0.0
    ok = False
    while not ok and time.monotonic() - began < 4 * ACSE_TIMEOUT:
        tries += 1
        ok, _ = _echo(node.port)
        waited = time.monotonic() - began
        if not ok:
            time.sleep(1.0)
    for sock in slow:
        sock.close()
    print(f"half-open: 17 connections from {attacker} sending 20 bytes of an A-ASSOCIATE-RQ, acse_timeout "
          f"{ACSE_TIMEOUT:g} s; good sender echoscu from 127.0.0.1")
    print(f"  (opening the 17 slow connections took {opened * 1000:.0f} ms; the good sender starts after)")
    print(f"  echoscu alone (baseline)         {baseline * 1000:8.1f} ms  ({'ok' if baseline_ok else 'FAILED'})")
    print(f"  echoscu under the slow peers     {waited * 1000:8.1f} ms to its first success, {tries} tries "
          f"({'ok' if ok else 'never succeeded'})   ratio: {waited / baseline:.1f}x   "
          f"within acse_timeout: {'yes' if ok and waited <= ACSE_TIMEOUT + 1.5 else 'no'}")
    time.sleep(ACSE_TIMEOUT + 1)  # the slow connections' threads end before the next scenario


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        node = Node(Path(tmp))
        try:
            pdu_claims(node)
            half_open(node, "127.0.0.2")
            half_open(node, "127.0.0.1")
        finally:
            node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
