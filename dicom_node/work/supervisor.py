"""The node's own workers: an inference and an export worker as child processes, restarted when they stop."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dicom_node.permissions import open_private, private_dir
from dicom_node.work.queues import QUEUES

__all__ = ["WorkerSupervisor"]

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """In a child: ask Linux to send SIGTERM when the node dies (even by SIGKILL), so no orphan worker stays."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class WorkerSupervisor:
    """Runs an inference and an export worker as child processes and restarts them when they stop.

    Used with the embedded broker (or ``queue.start_workers: true``) so that one command runs the whole node.
    A worker that keeps failing (a model that cannot load) is restarted with a growing pause, never in a loop.
    """

    def __init__(self, config_path: Path | None, log_dir: Path) -> None:
        self.config_path = config_path
        self.log_dir = log_dir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._failures: dict[str, int] = {}
        self._next_start: dict[str, float] = {}
        self._started_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def _command(self, queue: str) -> list[str]:
        cmd = [sys.executable, "-m", "dicom_node.cli", "worker", "--queues", queue]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def _spawn(self, queue: str) -> None:
        private_dir(self.log_dir)
        log_file = open_private(self.log_dir / f"worker-{queue}.log")
        self._procs[queue] = subprocess.Popen(
            self._command(queue), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log_file.close()
        self._started_at[queue] = time.monotonic()
        log.info("started %s worker (pid %d); log in %s", queue, self._procs[queue].pid, self.log_dir)

    def start(self) -> None:
        for queue in QUEUES:
            self._spawn(queue)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            for queue, proc in list(self._procs.items()):
                code = proc.poll()
                if code is None:
                    if now - self._started_at[queue] > 60:
                        self._failures[queue] = 0  # it stayed up: forget earlier failures
                    continue
                if queue not in self._next_start:
                    failures = self._failures.get(queue, 0) + 1
                    self._failures[queue] = failures
                    pause = min(60.0, 2.0 ** (failures - 1))
                    self._next_start[queue] = now + pause
                    log.warning(
                        "%s worker exited with code %s; restarting in %.0f s (see %s)",
                        queue, code, pause, self.log_dir / f"worker-{queue}.log",
                    )
                if now >= self._next_start[queue] and not self._stop.is_set():
                    del self._next_start[queue]
                    self._spawn(queue)

    def stop(self) -> None:
        self._stop.set()
        for proc in self._procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
