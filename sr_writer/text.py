"""Making model text safe for DICOM value representations.

Model output is untrusted text. Before any of it goes into a data element it is *sanitised* and, where the value
representation has a length limit, *truncated*:

* control characters (C0 and C1, DEL) are removed, except that line breaks are kept in multi-line text (ST, UT),
  written as CR LF; tabs become spaces;
* backslashes become ``/`` (a backslash is the value separator in LO/SH/CS and confuses many viewers elsewhere);
* runs of whitespace in single-line values (LO, SH) collapse to one space; leading/trailing whitespace is dropped;
* a value longer than its limit is cut and ends with ``...``. Limits are counted in characters, as the standard
  does for LO (64), SH (16), ST (1024); UT text is capped at :data:`MAX_UT_CHARS`, far below the UT limit, so
  that a runaway generation cannot produce a multi-megabyte report.

Nothing here changes text that is already clean, so Chinese text round-trips exactly.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

__all__ = [
    "LO_MAX",
    "MAX_UT_CHARS",
    "SH_MAX",
    "ST_MAX",
    "ascii_code_string",
    "is_ascii",
    "multi_line",
    "needs_utf8",
    "single_line",
]

LO_MAX = 64
SH_MAX = 16
ST_MAX = 1024
MAX_UT_CHARS = 10_000

_ELLIPSIS = "..."
_LINE_BREAKS = re.compile(r"\r\n|\r|\n|\u2028|\u2029|\u0085")
_SPACES = re.compile(r"[ \t\u3000\u00a0]+")


def _drop_controls(text: str) -> str:
    """``text`` without control characters (Unicode category Cc) and with backslashes as slashes."""
    text = text.replace("\\", "/").replace("\t", " ")
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cc")


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - len(_ELLIPSIS)].rstrip() + _ELLIPSIS


def single_line(text: str, limit: int = LO_MAX) -> str:
    """``text`` as a one-line value (LO, SH, PN components): no controls, no backslash, at most ``limit`` chars."""
    text = _LINE_BREAKS.sub(" ", text)
    text = _SPACES.sub(" ", _drop_controls(text)).strip()
    return _cut(text, limit)


def multi_line(text: str, limit: int = MAX_UT_CHARS) -> str:
    """``text`` as multi-line text (ST, UT): lines kept (CR LF), other controls dropped, at most ``limit`` chars."""
    lines = [_drop_controls(line).rstrip() for line in _LINE_BREAKS.split(text)]
    return _cut("\r\n".join(lines).strip(), limit)


def ascii_code_string(text: str, limit: int = SH_MAX) -> str:
    """``text`` as a DICOM code string (CS): upper-case ASCII letters, digits and underscores only."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").upper()
    cleaned = re.sub(r"[^A-Z0-9_]+", "_", folded).strip("_")
    cleaned = re.sub(r"_+", "_", cleaned)
    return cleaned[:limit].rstrip("_") or "AI"


def is_ascii(text: str) -> bool:
    return text.isascii()


def needs_utf8(texts: Iterable[str]) -> bool:
    """Whether any of ``texts`` holds a character outside ASCII (then Specific Character Set is ISO_IR 192)."""
    return any(not t.isascii() for t in texts)
