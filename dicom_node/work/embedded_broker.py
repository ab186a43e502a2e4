"""The embedded broker: kombu's filesystem transport, with each message written atomically.

kombu's filesystem transport creates a message file under its final name and then writes it. A worker polling the
folder can take the file in between, read nothing, and stop with ``JSONDecodeError`` ("Unrecoverable error"): the
message is gone (kombu removes the file before decoding it) and the worker process exits. Measured with
``bench/bench_queue.py --variants embedded``: the inference worker stopped within the first ten jobs.

Messages are taken in the order of their names, so a name starts with the message's priority: an urgent job's
message overtakes the routine ones already waiting, as it does on Redis.

Here a message is written under a name the consumers ignore (it starts with a dot, so its suffix is not
``<queue>.msg``) and renamed to its final name once complete; a rename within one folder is atomic, so a consumer
sees the whole message or none of it. Everything else is kombu's. The job store stays the source of truth: a
message lost some other way is sent again by the reconciler (DESIGN invariant 3).

The transport is registered under the URL scheme ``nodefs://``; :func:`dicom_node.work.celery_app.broker_settings`
uses it for ``queue.broker_url: embedded``.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps

from dicom_node.permissions import FILE_MODE

__all__ = ["SCHEME", "Transport"]

SCHEME = "nodefs"


class Channel(filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]  # kombu names it twice
        # Consumers take the folder in name order: the priority first (0 urgent before 5 routine, as on Redis), then
        # the time, zero-padded so that the order of names is the order of arrival.
        priority = self._get_message_priority(payload, reverse=False)
        name = f"{priority}_{round(time.time() * 1000):015d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.part")
        data = dumps(payload).encode("utf-8")
        try:
            # Mode 0640 whatever the umask, like every file the node creates (dicom_node.permissions).
            with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb", buffering=0) as f:
                f.write(data)
            os.rename(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"cannot add message {name!r} to {self.data_folder_out!r}: {exc}") from exc


class Transport(filesystem.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
