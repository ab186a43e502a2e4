"""The engine: one loaded model, and a study in, grounded findings out.

``Engine.load`` picks the adapter and the backend from the registries (lazy imports), checks the checkpoint
directory and loads the weights from local files only. ``Engine.run_study`` reads the study's files, chooses the
images (:func:`inference.pixels.select_images`), renders them, lets the adapter build the inputs, generates in
batches, lets the adapter parse the answers and returns an :class:`~sr_writer.findings.InferenceResult` whose boxes
are in source pixel space.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from inference.adapters.base import ModelAdapter
from inference.backends.base import Backend
from inference.batching import Batcher, BatchReport, Priority
from inference.config import ModelSettings
from inference.errors import PoisonInputError
from inference.pixels import (
    ImageCandidate,
    InstanceHeader,
    load_candidates,
    read_header,
    select_images,
)
from inference.regions import region_from_dataset
from inference.registry import adapter_class, backend_class
from inference.types import ModelImage, ParsedAnswer, PreparedInput, Profile, RegionInput, TaskRequest
from sr_writer.findings import (
    AlgorithmIdentity,
    BoundingBox,
    Finding,
    ImageRef,
    InferenceResult,
    Language,
    Report,
    uid_hash,
)

__all__ = ["Engine", "compose_report"]

logger = logging.getLogger(__name__)

_SECTIONS = {
    Language.ENGLISH: (re.compile(r"\bfindings?\s*[:：]", re.I), re.compile(r"\bimpressions?\s*[:：]", re.I)),
    Language.CHINESE: (
        re.compile(r"影像(?:诊断|所见|表现)\s*[:：]"),
        re.compile(r"(?:影像结论|诊断意见|印象)\s*[:：]"),
    ),
}


def compose_report(narratives: Sequence[str], language: Language) -> Report:
    """The narrative report: the answers' "Findings:"/"Impression:" (影像诊断/影像结论) parts, joined over images."""
    findings: list[str] = []
    impressions: list[str] = []
    head, tail = _SECTIONS[language]
    for text in narratives:
        text = text.strip()
        if not text:
            continue
        imp = tail.search(text)
        body, impression = (text[: imp.start()], text[imp.end() :]) if imp else (text, "")
        start = head.search(body)
        body = body[start.end() :] if start else body
        for part, out in ((body.strip(), findings), (impression.strip(), impressions)):
            if part and part not in out:
                out.append(part)
    return Report(findings="\n".join(findings), impression="\n".join(impressions), language=language)


class Engine:
    """One model, loaded once per worker process (DESIGN invariant 5)."""

    def __init__(
        self, settings: ModelSettings, adapter: ModelAdapter, backend: Backend, identity: AlgorithmIdentity
    ) -> None:
        self.settings = settings
        self.adapter = adapter
        self.backend = backend
        self.identity = identity
        self.batcher: Batcher | None = None

    def start_batching(self, on_batch: Callable[[BatchReport], None] | None = None) -> Batcher:
        """Share the backend between threads: from now on every :meth:`run_study` call (from any thread) hands its
        images to one :class:`~inference.batching.Batcher`, which runs them in batches of up to ``model.batch_size``
        with the images of the other studies in flight."""
        if self.batcher is None:
            self.batcher = Batcher(
                self.backend.generate, self.settings.batch_size, self.settings.batch_wait_ms, on_batch=on_batch
            )
        return self.batcher

    @staticmethod
    def preflight(settings: ModelSettings) -> None:
        """Check, cheaply, that the family and backend exist and the runtime can run here (TensorRT and CUDA for
        ``tensorrt``); :class:`ModelLoadError` with one line saying what is missing. Reads no checkpoint file."""
        adapter = adapter_class(settings.family)(settings)
        backend_class(settings.backend)(adapter, settings, settings.device).check_runtime()

    @classmethod
    def load(cls, settings: ModelSettings, device: str | None = None) -> Engine:
        """Build the adapter and backend for ``settings`` and load the weights; :class:`ModelLoadError` on failure."""
        if device is not None:
            settings = settings.model_copy(
                update={"device": ModelSettings.model_validate({**settings.model_dump(), "device": device}).device}
            )
        adapter = adapter_class(settings.family)(settings)
        backend_cls = backend_class(settings.backend)  # an unknown backend fails before any file is read
        directory = adapter.check_checkpoint()
        backend = backend_cls(adapter, settings, settings.device)
        backend.load()
        base = adapter.identity(directory)
        identity = replace(base, parameters={**base.parameters, **backend.describe()})
        logger.info(
            "model ready: family %s, checkpoint %s, version %s", identity.family, identity.name, identity.version
        )
        return cls(settings, adapter, backend, identity)

    # -- warm-up --
    def warm_up(self) -> None:
        """One tiny generation so the first job does not pay for lazy initialisation (kernels, caches)."""
        ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
        image = ModelImage(pixels=np.ascontiguousarray(ramp), ref=ImageRef("2.25.0"), modality="OT")
        request = TaskRequest(Profile.VQA, question="What does this image show?")
        started = time.perf_counter()
        self.backend.warm_up(self.adapter.prepare(image, request))
        logger.info("warm-up generation took %.2f s", time.perf_counter() - started)

    # -- one study --
    def run_study(
        self,
        files: Sequence[Path],
        profile: str | Profile,
        language: str | Language = "en",
        targets: Sequence[str] = (),
        region: RegionInput | BoundingBox | None = None,
        question: str = "",
        priority: int = Priority.ROUTINE,
    ) -> InferenceResult:
        """Run ``profile`` on a study's files; boxes in the result are in source pixel space.

        ``region`` (region_to_text): a :class:`RegionInput` or a box on the first selected image; when ``None`` the
        first graphic of a GSPS or SR in ``files`` is used. ``question`` is the vqa question. ``priority`` orders
        the images in the batcher's queue (:class:`~inference.batching.Priority`) when batching is on.
        Raises :class:`PoisonInputError` when no usable image exists or the region has nothing to point at.
        """
        profile = Profile(profile)
        language = Language(language)
        headers = [h for h in (read_header(Path(p)) for p in files) if h is not None]
        if isinstance(region, BoundingBox):
            region = RegionInput(box=region)
        if profile is Profile.REGION_TO_TEXT and region is None:
            region = self._region_from_study(headers)
        candidates = select_images(headers, self.settings.slices_per_series, self.settings.max_images_per_study)
        if profile is Profile.REGION_TO_TEXT:
            candidates = self._region_image(headers, candidates, region)
        if not candidates:
            raise PoisonInputError(f"study has no image to read ({len(headers)} DICOM files, none with pixels)")
        images, problems = load_candidates(candidates, self.settings.window)
        if not images:
            raise PoisonInputError("no image of the study could be decoded: " + "; ".join(problems[:3]))
        request = TaskRequest(profile, language, tuple(targets), region, question)
        prepared = [self.adapter.prepare(image, request) for image in images]
        answers = self._generate(prepared, priority)
        findings: list[Finding] = []
        narratives: list[str] = []
        for item, answer in zip(prepared, answers, strict=True):
            findings.extend(answer.findings)
            narratives.append(answer.narrative)
            if answer.problems:
                logger.info(
                    "image %s: %d parse notes: %s",
                    uid_hash(item.image.ref.sop_instance_uid),
                    len(answer.problems),
                    "; ".join(answer.problems[:5]),
                )
        study_uid = next((h.study_instance_uid for h in headers if h.study_instance_uid), "")
        if profile is Profile.VQA or profile is Profile.REGION_TO_TEXT:
            report = Report(findings="\n".join(dict.fromkeys(n for n in narratives if n)), language=language)
        else:
            report = compose_report(narratives, language)
        return InferenceResult(study_uid, profile.value, self.identity, tuple(findings), report, language)

    def _generate(self, prepared: Sequence[PreparedInput], priority: int = Priority.ROUTINE) -> list[ParsedAnswer]:
        if self.batcher is not None:
            texts = self.batcher.generate(prepared, priority)
            return [self.adapter.parse(text, item) for text, item in zip(texts, prepared, strict=True)]
        answers: list[ParsedAnswer] = []
        size = self.settings.batch_size
        for start in range(0, len(prepared), size):
            batch = prepared[start : start + size]
            began = time.perf_counter()
            texts = self.backend.generate(batch)
            logger.info("generated %d answer(s) in %.2f s", len(batch), time.perf_counter() - began)
            answers.extend(self.adapter.parse(text, item) for text, item in zip(texts, batch, strict=True))
        return answers

    @staticmethod
    def _region_from_study(headers: Sequence[InstanceHeader]) -> RegionInput:
        for header in headers:
            if header.is_image:
                continue
            try:
                ds = pydicom.dcmread(header.path)
            except (InvalidDicomError, OSError) as exc:
                logger.warning("cannot read %s for a region: %s", header.path.name, type(exc).__name__)
                continue
            found = region_from_dataset(ds)
            if found is not None:
                return found
        raise PoisonInputError("profile region_to_text needs a region: no GSPS or SR with a graphic in the study")

    @staticmethod
    def _region_image(
        headers: Sequence[InstanceHeader], candidates: Sequence[ImageCandidate], region: RegionInput | None
    ) -> list[ImageCandidate]:
        if region is None or region.ref is None:
            return list(candidates[:1])
        for header in headers:
            if header.sop_instance_uid == region.ref.sop_instance_uid and header.is_image:
                if region.ref.frame_number > header.frames:
                    break
                return [ImageCandidate(header, region.ref.frame_number)]
        raise PoisonInputError(
            f"the marked region refers to image {uid_hash(region.ref.sop_instance_uid)} frame "
            f"{region.ref.frame_number}, which is not in the study"
        )
