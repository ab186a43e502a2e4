"""Batching across studies: the prepared images of every job in flight in one worker share the backend's batches.

Each job's thread calls :meth:`Batcher.generate` with its own images and waits; one dispatcher thread gathers the
waiting images into batches of at most ``max_batch`` (waiting at most ``max_wait_ms`` after the first one arrives
for others to join), urgent requests first, calls the backend once per batch and hands every answer back to the
job it belongs to. The backend only ever runs on the dispatcher thread.

A batch that fails is run again image by image, so an image that breaks the backend fails its own job only: the
caller of that image gets the exception, the others their answers. Greedy decoding makes an answer independent
of the batch it was part of (the backends' parity tests check batch 1 against batch 3), so a study gives the same
findings whether it ran alone or beside others.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference.types import PreparedInput

__all__ = ["BatchReport", "Batcher", "Priority"]

logger = logging.getLogger(__name__)


class Priority:
    """Request priorities: lower runs first."""

    URGENT = 0
    ROUTINE = 5

    @staticmethod
    def of(name: str) -> int:
        return Priority.URGENT if name == "urgent" else Priority.ROUTINE


@dataclass(frozen=True)
class BatchReport:
    """What one backend call did, for metrics and logs."""

    size: int
    seconds: float
    failed: bool  # the batch failed and its images were run one by one
    waits: tuple[float, ...]  # seconds each image waited for its batch to start
    priorities: tuple[int, ...]


@dataclass
class _Request:
    item: PreparedInput
    priority: int
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    answer: str | None = None
    error: BaseException | None = None


class Batcher:
    """Gathers images of concurrent callers into backend batches (see the module docstring)."""

    def __init__(
        self,
        generate: Callable[[Sequence[PreparedInput]], list[str]],
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._generate = generate
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms / 1000)
        self._on_batch = on_batch
        self._queue: list[tuple[int, int, _Request]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    # -- callers --
    def generate(self, items: Sequence[PreparedInput], priority: int = Priority.ROUTINE) -> list[str]:
        """The answers for ``items`` (in order), computed in batches with other callers' images.

        Raises the backend's exception for the first item that failed even when run alone.
        """
        now = time.monotonic()
        requests = [_Request(item, priority, now) for item in items]
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            for request in requests:
                heapq.heappush(self._queue, (priority, next(self._order), request))
            self._cond.notify_all()
        for request in requests:
            request.done.wait()
        for request in requests:
            if request.error is not None:
                raise request.error
        return [str(r.answer) for r in requests]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # -- the dispatcher thread --
    def _take_batch(self) -> list[_Request]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            first_arrival = min(r.arrived for _, _, r in self._queue)
            deadline = first_arrival + self.max_wait
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=left)
            count = min(self.max_batch, len(self._queue))
            return [heapq.heappop(self._queue)[2] for _ in range(count)]

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            started = time.monotonic()
            failed = False
            try:
                answers = self._generate([r.item for r in batch])
                for request, answer in zip(batch, answers, strict=True):
                    request.answer = answer
            except Exception as exc:  # the dispatcher's boundary: the images are run again one by one
                failed = True
                if len(batch) == 1:
                    batch[0].error = exc
                else:
                    logger.warning("a batch of %d images failed (%s: %s); running them one by one",
                                   len(batch), type(exc).__name__, exc)
                    for request in batch:
                        try:
                            request.answer = self._generate([request.item])[0]
                        except Exception as alone:  # this image's own failure: its caller gets it
                            request.error = alone
            finally:
                for request in batch:
                    if request.answer is None and request.error is None:
                        request.error = RuntimeError("the batch was interrupted")
                    request.done.set()
            if self._on_batch is not None:
                report = BatchReport(
                    size=len(batch), seconds=time.monotonic() - started, failed=failed,
                    waits=tuple(started - r.arrived for r in batch), priorities=tuple(r.priority for r in batch),
                )
                try:
                    self._on_batch(report)
                except Exception:  # metrics must never stop the dispatcher
                    logger.exception("batch report hook failed")

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
