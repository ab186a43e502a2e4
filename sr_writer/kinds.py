"""The kinds of result object the writers build, as a plain enum that any process can import cheaply.

Apart from :mod:`sr_writer.context` (which imports highdicom) so that the node's configuration can name them.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ObjectKind"]


class ObjectKind(str, Enum):
    """The result object types; the value is the short name used in UIDs, options and file names."""

    SR = "sr"
    GSPS = "gsps"
    SEG = "seg"
    SC = "sc"
