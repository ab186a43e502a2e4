"""The DIMSE status codes the node answers with (its SCP) and meets (its SCU): one enum for both.

C-STORE statuses are PS3.4 B.2.3 and PS3.7 C; C-ECHO answers Success (PS3.4 A.4). A range of codes (A7xx, A9xx,
Cxxx) is named by its base.
"""

from __future__ import annotations

import enum

__all__ = ["Status"]


class Status(enum.IntEnum):
    """A DIMSE status code by its name in the standard."""

    SUCCESS = 0x0000
    COERCION_OF_DATA_ELEMENTS = 0xB000  # Warning
    ELEMENTS_DISCARDED = 0xB006  # Warning
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007  # Warning
    PROCESSING_FAILURE = 0x0110  # Failure, with an Error Comment (PS3.7 C.4.1.1.4)
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORISED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700  # Refused: A700-A7FF (storage: disk full, write or record failed)
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: A900-A9FF
    DATASET_MISMATCH = 0xA900  # the same code, by the shorter name the intake answers with
    CANNOT_UNDERSTAND = 0xC000  # Error: C000-CFFF (malformed, truncated, bad UIDs)
