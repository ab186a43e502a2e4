"""Event-driven waits for the two threads of each association the node accepts.

pynetdicom runs an association on two threads that poll. The association's reactor sleeps 1 ms before every look
at its queues, and the DUL's reactor (which reads PDUs and sends what the association hands it) sleeps 1 ms
whenever a pass found nothing to do. So a C-STORE request waits up to 1 ms for the association thread to notice
it, and the response up to 1 ms more for the DUL thread to send it, while the sender waits for that response
before it sends the next instance. With several associations, every one of those thousand wake-ups a second per
thread is also a bid for the GIL that makes the thread doing real work hand it over.

Here those sleeps become waits that end as soon as the thread has work:

* the association thread waits on its DIMSE message queue, and is woken by a new message, by a primitive for it
  from the DUL (release, abort) and by the DUL thread's end;
* the DUL thread waits in ``select`` on the peer's socket and on a wake-up socket pair, written to when the
  association thread queues a primitive to send or asks the DUL to stop.

A wait with nothing to wake it ends after :data:`IDLE_WAIT`, so that the timers the reactors check on each pass
(ARTIM, the network time-out) are still noticed in time. pynetdicom's reactors are otherwise unchanged: its
modules ``association`` and ``dul`` get a stand-in for ``time`` whose ``sleep`` waits as above on these threads
and sleeps as before on every other (the node's own SCU associations keep pynetdicom's behaviour).

Installed per accepted association by :func:`make_event_driven` on EVT_CONN_OPEN, before its threads start.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from dicom_node.intake.transport import guard_of

__all__ = ["IDLE_WAIT", "make_event_driven"]

#: Longest wait of a reactor thread with nothing to wake it: how late it may notice an expired timer.
IDLE_WAIT = 0.05
#: How often an accepted connection waiting for its association request checks whether it has ended.
_ENDED_CHECK = 0.02


class _ReactorTime:
    """Stands in for the ``time`` module in pynetdicom's ``association`` and ``dul`` modules: ``sleep`` on a thread
    of an event-driven association waits for work instead; everything else is the real module's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wait: Callable[[float], None] | None = getattr(threading.current_thread(), "wait_for_work", None)
        if wait is None:
            time.sleep(seconds)
        else:
            wait(seconds)


_install_lock = threading.Lock()


def _install_reactor_time() -> None:
    with _install_lock:
        for module in (pynetdicom.association, pynetdicom.dul):
            if not isinstance(module.time, _ReactorTime):  # type: ignore[attr-defined]
                module.time = _ReactorTime()  # type: ignore[attr-defined]


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue whose ``put`` also wakes a waiting reactor thread (set as ``wake``)."""

    wake: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake()


def _waking(q: queue.Queue, wake: Callable[[], None]) -> None:  # type: ignore[type-arg]
    q.__class__ = _WakingQueue
    q.wake = wake  # type: ignore[attr-defined]


class _EventDrivenAssociation(Association):
    """An accepted association whose reactor thread waits for DIMSE messages and DUL primitives instead of
    sleeping 1 ms between looks."""

    _ending: bool

    def wait_for_work(self, seconds: float) -> None:
        if self._ending:  # kill() and abort wait for the DUL thread to stop, which wakes nobody: poll as before
            time.sleep(seconds)
            return
        messages = self.dimse.msg_queue
        with messages.not_empty:
            # The DUL puts the release or abort primitives in its own queue, then wakes this condition: reading
            # that queue's length under this condition's lock cannot miss the wake-up.
            if messages.queue or self.dul.to_user_queue.queue or self._kill or not self.dul.is_alive():
                return
            messages.not_empty.wait(max(seconds, IDLE_WAIT))

    def wake(self) -> None:
        condition = self.dimse.msg_queue.not_empty
        with condition:
            condition.notify_all()

    def kill(self) -> None:
        self._ending = True
        super().kill()


class _EventDrivenDUL(DULServiceProvider):
    """A DUL provider whose reactor thread waits in ``select`` for the peer's data or a wake-up from the
    association thread, instead of sleeping 1 ms when a pass found nothing to do."""

    _wake_reader: socket.socket
    _wake_writer: socket.socket

    # pynetdicom sets ``_kill_thread`` to stop the reactor; setting it here also wakes the reactor to see it.
    @property  # type: ignore[override]
    def _kill_thread(self) -> bool:
        return bool(self.__dict__.get("_kill_thread", False))

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self.__dict__["_kill_thread"] = value
        if value:
            self.wake()

    def wake(self) -> None:
        """Wake the reactor thread (a no-op on that thread: it is not waiting)."""
        if threading.current_thread() is not self:
            with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (the thread ended)
                self._wake_writer.send(b"\0")

    def wait_for_work(self, seconds: float) -> None:
        if self._kill_thread or self.to_provider_queue.queue or self.event_queue.queue:
            return
        peer = self.socket.socket if self.socket is not None else None
        if peer is None or peer.fileno() < 0:
            time.sleep(seconds)
            return
        if isinstance(peer, ssl.SSLSocket) and peer.pending():  # decrypted data select cannot see
            return
        try:
            ready, _, _ = select.select([peer, self._wake_reader], [], [], max(seconds, IDLE_WAIT))
        except (OSError, ValueError):  # the socket was closed meanwhile: the reactor's next pass reports it
            return
        if self._wake_reader in ready:
            with contextlib.suppress(OSError):
                self._wake_reader.recv(4096)

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        """As pynetdicom's, except that an accepted connection waiting for its A-ASSOCIATE-RQ stops waiting as soon
        as the connection has ended (closed, refused or gone silent past its deadline), instead of holding its
        association thread, and a place under the node's connection limits, for the rest of the ACSE time-out."""
        assoc = self.assoc
        if not wait or timeout is None or assoc.is_established or not assoc.is_acceptor:
            return super().receive_pdu(wait, timeout)
        deadline = time.monotonic() + timeout
        guard = guard_of(assoc)
        while True:
            remaining = deadline - time.monotonic()
            primitive = super().receive_pdu(wait=True, timeout=max(0.0, min(remaining, _ENDED_CHECK)))
            if primitive is not None:
                return primitive
            ended = guard is not None and guard.ended
            if remaining <= _ENDED_CHECK or ended or not self.is_alive():
                if guard is not None:
                    guard.unrequested()
                return None

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._wake_reader.close()
            self._wake_writer.close()
            assoc = self.assoc
            if isinstance(assoc, _EventDrivenAssociation):
                assoc.wake()  # its reactor checks whether this thread is alive


def make_event_driven(assoc: Association) -> None:
    """Make an accepted association's two threads wait for work instead of polling (before they start)."""
    dul = assoc.dul
    if type(assoc) is not Association or type(dul) is not DULServiceProvider or dul.is_alive():
        return  # not pynetdicom's own classes, or already running: leave it as it is
    _install_reactor_time()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    dul.__class__ = _EventDrivenDUL
    events = cast(_EventDrivenDUL, dul)
    events._wake_reader, events._wake_writer = reader, writer
    assoc.__class__ = _EventDrivenAssociation
    association = cast(_EventDrivenAssociation, assoc)
    association._ending = False
    _waking(dul.to_provider_queue, events.wake)
    _waking(dul.event_queue, events.wake)
    _waking(dul.to_user_queue, association.wake)
