"""The batcher on its own: concurrent callers share batches, urgent images go first, a failing image fails alone.

The backend here is a plain function that records the batches it is given (a unit test of one small class); the
worker-level tests with the real model are in tests/dicom_node/test_batching.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from inference.batching import Batcher, BatchReport, Priority
from inference.geometry import ImageTransform
from inference.types import ModelImage, PreparedInput, Profile, Prompt, TaskRequest
from sr_writer.findings import ImageRef


def _item(name: str) -> PreparedInput:
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    image = ModelImage(pixels=pixels, ref=ImageRef(f"2.25.{abs(hash(name)) % 10**12}"))
    request = TaskRequest(Profile.VQA, question="what?")
    return PreparedInput(image, request, pixels, ImageTransform.identity(4, 4), Prompt(name), 4)


class Recorder:
    """A backend that answers each prompt with itself, remembers each batch, and refuses prompts named 'poison'."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, batch: Sequence[PreparedInput]) -> list[str]:
        names = [item.prompt.text for item in batch]
        with self.lock:
            self.batches.append(names)
        time.sleep(self.delay)
        if "poison" in names:
            raise ValueError("this image breaks the model")
        return [f"answer to {name}" for name in names]


def _callers(batcher: Batcher, requests: list[tuple[str, int]], results: dict[str, Any]) -> list[threading.Thread]:
    def call(name: str, priority: int) -> None:
        try:
            results[name] = batcher.generate([_item(name)], priority)[0]
        except Exception as exc:
            results[name] = exc

    return [threading.Thread(target=call, args=request) for request in requests]


def test_concurrent_studies_share_one_batch_and_each_gets_its_own_answer() -> None:
    backend = Recorder()
    reports: list[BatchReport] = []
    results: dict[str, Any] = {}
    with Batcher(backend, max_batch=8, max_wait_ms=300, on_batch=reports.append) as batcher:
        threads = _callers(batcher, [(f"study {i}", Priority.ROUTINE) for i in range(6)], results)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {f"study {i}": f"answer to study {i}" for i in range(6)}
    assert sorted(len(b) for b in backend.batches) == [6], backend.batches
    assert [r.size for r in reports] == [6] and not reports[0].failed


def test_a_study_of_several_images_keeps_their_order_and_batches_are_capped() -> None:
    backend = Recorder()
    with Batcher(backend, max_batch=3, max_wait_ms=0) as batcher:
        answers = batcher.generate([_item(f"image {i}") for i in range(7)])
    assert answers == [f"answer to image {i}" for i in range(7)]
    assert [len(b) for b in backend.batches] == [3, 3, 1]


def test_urgent_images_overtake_routine_ones_waiting() -> None:
    backend = Recorder(delay=0.3)
    results: dict[str, Any] = {}
    with Batcher(backend, max_batch=2, max_wait_ms=0) as batcher:
        first = _callers(batcher, [("routine 0", Priority.ROUTINE)], results)
        first[0].start()
        time.sleep(0.1)  # the first batch is running; everything below waits
        waiting = _callers(batcher, [(f"routine {i}", Priority.ROUTINE) for i in range(1, 5)], results)
        for t in waiting:
            t.start()
        time.sleep(0.05)
        urgent = _callers(batcher, [("urgent", Priority.URGENT)], results)
        urgent[0].start()
        for t in [*first, *waiting, *urgent]:
            t.join()
    assert backend.batches[0] == ["routine 0"]
    assert "urgent" in backend.batches[1], backend.batches
    assert len(results) == 6


def test_an_image_that_breaks_the_batch_fails_only_its_own_caller() -> None:
    backend = Recorder()
    reports: list[BatchReport] = []
    results: dict[str, Any] = {}
    with Batcher(backend, max_batch=4, max_wait_ms=300, on_batch=reports.append) as batcher:
        threads = _callers(batcher, [("a", 5), ("poison", 5), ("b", 5), ("c", 5)], results)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results["a"] == "answer to a" and results["b"] == "answer to b" and results["c"] == "answer to c"
    assert isinstance(results["poison"], ValueError) and "breaks the model" in str(results["poison"])
    assert len(backend.batches[0]) == 4 and all(len(b) == 1 for b in backend.batches[1:])
    assert reports[0].failed and reports[0].size == 4


def test_a_closed_batcher_refuses_new_work() -> None:
    batcher = Batcher(Recorder(), max_batch=2, max_wait_ms=0)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.generate([_item("late")])
