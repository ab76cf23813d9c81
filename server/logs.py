"""Logging set-up: ``console`` for people, ``json`` for one JSON object per line (uvicorn's logs included).

Both formats escape control characters in everything a record carries (the message, extra fields, a traceback's
lines), so text from a request (a percent-decoded path with ``%0A``, a model name, an exception message quoting
input) can never start a forged log line or send terminal escape sequences: one record is one line, whatever the
input. The escaping happens in the formatters, so it covers every logger, ours and uvicorn's alike.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

# color_message: uvicorn's ANSI-coloured copy of the message, useless in JSON.
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}

# C0 controls, DEL, C1 controls (NEL among them) and the Unicode line and paragraph separators: everything a terminal
# or a log viewer may treat as a line break or an escape sequence.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
CONTINUATION = "  | "
"""Prefix of a console record's further lines (traceback, stack): no such line can pass for a record of its own."""


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    r"""``text`` with control characters written as escapes (``\n``, ``\r``, ``\t``, ``\x1b``, ``\u2028``)."""
    return _CONTROL.sub(_escape_one, text)


def _escape_value(value: Any) -> Any:
    return escape_controls(value) if isinstance(value, str) else value


class ConsoleFormatter(logging.Formatter):
    """``time LEVEL logger: message``; control characters escaped, a traceback's lines prefixed with ``  | ``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # A copy: the record is shared with every other handler (pytest's caplog, a user's own).
        line = logging.makeLogRecord(record.__dict__)
        line.msg, line.args = escape_controls(record.getMessage()), None
        line.exc_info, line.exc_text, line.stack_info = None, None, None
        line.name = escape_controls(record.name)
        text = super().format(line)
        blocks = []
        if record.exc_info:
            blocks.append(self.formatException(record.exc_info))
        elif record.exc_text:
            blocks.append(record.exc_text)
        if record.stack_info:
            blocks.append(self.formatStack(record.stack_info))
        for block in blocks:
            text += "".join(f"\n{CONTINUATION}{escape_controls(part)}" for part in block.splitlines())
        return text


class JSONFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, extra fields, exception text.

    String values have their control characters escaped before JSON encoding, so the decoded message (what ``jq -r``
    prints) holds ``\\n`` rather than a line break; the traceback (``exc_info``) keeps its own line breaks, which JSON
    encodes.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": escape_controls(record.name),
            "message": escape_controls(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[escape_controls(key)] = _escape_value(value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        return json.dumps(out, default=lambda v: escape_controls(str(v)))


def configure_logging(fmt: str = "console", level: str = "INFO") -> None:
    """Route every logger (uvicorn's too) through one stderr handler in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # httpx logs every request at INFO (noisy for a server); keep its warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
