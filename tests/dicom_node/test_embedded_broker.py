"""The embedded broker's messages against a consumer in another process polling the same folder.

With kombu's own filesystem transport this harness lost 188 of 300 messages (the consumer read files still being
written and stopped on ``JSONDecodeError``); the node's transport writes each message atomically.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kombu import Connection

from dicom_node.work import embedded_broker

pytestmark = pytest.mark.integration

_CONSUMER = """
import json, sys
from kombu import Connection
import dicom_node.work.embedded_broker
folder, expected = sys.argv[1], int(sys.argv[2])
options = {"data_folder_in": folder + "/m", "data_folder_out": folder + "/m", "control_folder": folder + "/c",
           "polling_interval": 0.001}
seen, errors = [], []
with Connection(f"{dicom_node.work.embedded_broker.SCHEME}://localhost//", transport_options=options) as conn:
    queue = conn.SimpleQueue("inference")
    while len(seen) + len(errors) < expected:
        try:
            message = queue.get(timeout=20)
        except queue.Empty:
            break
        except Exception as exc:
            errors.append(repr(exc)[:200])
            continue
        seen.append(message.payload["n"])
        message.ack()
print(json.dumps({"seen": seen, "errors": errors}))
"""


def test_a_consumer_polling_the_folder_never_reads_a_message_being_written(tmp_path: Path) -> None:
    count = 300
    (tmp_path / "m").mkdir()
    (tmp_path / "c").mkdir()
    consumer = subprocess.Popen(
        [sys.executable, "-c", _CONSUMER, str(tmp_path), str(count)], stdout=subprocess.PIPE, text=True
    )
    time.sleep(1.0)  # the consumer is polling before the first message
    options = {
        "data_folder_in": str(tmp_path / "m"),
        "data_folder_out": str(tmp_path / "m"),
        "control_folder": str(tmp_path / "c"),
    }
    with Connection(f"{embedded_broker.SCHEME}://localhost//", transport_options=options) as conn:
        queue = conn.SimpleQueue("inference")
        for n in range(count):
            queue.put({"n": n, "padding": "x" * 200_000})  # large enough that a write is not instantaneous
    out, _ = consumer.communicate(timeout=120)
    result = json.loads(out)
    assert result["errors"] == []
    assert sorted(result["seen"]) == list(range(count))
    assert not [p.name for p in (tmp_path / "m").iterdir()], "every message was taken; no partial file is left"
