"""Small pieces of the console: the preview's boxes land on the right pixels, webhook bodies, webhook settings."""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.config import ConfigError, load_settings
from dicom_node.console.preview import PreviewError, render_preview
from dicom_node.console.webhooks import render_body
from sr_writer.findings import BoundingBox, Finding, ImageRef
from tests.corpus import corpus_file

YELLOW = (0xFF, 0xCC, 0x00)


def test_a_box_in_source_pixels_is_drawn_on_the_scaled_preview_where_it_belongs() -> None:
    path = corpus_file("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    rows, columns = int(ds.Rows), int(ds.Columns)
    box = BoundingBox(columns * 0.25, rows * 0.5, columns * 0.75, rows * 0.75)
    finding = Finding(label="opacity", box=box, source=ImageRef(str(ds.SOPInstanceUID)))
    png = render_preview(path, [(1, finding)])
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    scale = image.shape[1] / columns
    assert max(image.shape[:2]) == 768 and abs(image.shape[0] - rows * scale) <= 1
    yellow = np.all(image == YELLOW, axis=-1)
    ys, xs = np.nonzero(yellow)
    assert len(xs) > 100
    assert abs(xs.min() - box.x0 * scale) <= 2 and abs(xs.max() - box.x1 * scale) <= 2
    assert abs(ys.min() - box.y0 * scale) <= 2 and abs(ys.max() - box.y1 * scale) <= 2
    plain = np.asarray(Image.open(io.BytesIO(render_preview(path, []))).convert("RGB"))
    assert not np.all(plain == YELLOW, axis=-1).any()


def test_a_file_without_pixels_says_so(tmp_path: object) -> None:
    path = corpus_file("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    del ds.PixelData
    out = tmp_path / "nopixels.dcm"  # type: ignore[operator]
    ds.save_as(out)
    with pytest.raises(PreviewError, match="no pixel data"):
        render_preview(out, [])


def test_webhook_bodies_from_the_default_and_a_custom_template() -> None:
    context = {"event": "job_failed", "node": "AINODE", "at": 1.0, "job": {"id": 3, "error": 'a "quoted" reason'},
               "findings": [], "console_url": "http://127.0.0.1:8080/jobs/3"}
    body = json.loads(render_body(None, context))
    assert body["job"]["error"] == 'a "quoted" reason' and body["event"] == "job_failed"
    custom = json.loads(render_body('{"text": {{ ("job %d: %s" % (job.id, event)) | tojson }}}', context))
    assert custom == {"text": "job 3: job_failed"}
    with pytest.raises(ValueError, match="does not render to JSON"):
        render_body("job {{ job.id }} failed", context)


def test_webhook_settings_are_checked_at_load() -> None:
    good = {"notifications": {"webhooks": [{"name": "ops", "url": "https://hooks.example.org/T0KEN"}]}}
    settings = load_settings(None, good)
    assert "T0KEN" not in settings.model_dump_json()  # masked wherever the settings are shown
    for bad, says in (
        ({"name": "ops", "url": "ftp://example.org"}, "http:// or https://"),
        ({"name": "ops", "url": "https://x.org", "template": "{% if %}"}, "not a valid Jinja2 template"),
        ({"name": "ops", "url": "https://x.org", "events": ["job_lost"]}, "job_failed"),
    ):
        with pytest.raises(ConfigError, match=says):
            load_settings(None, {"notifications": {"webhooks": [bad]}})
