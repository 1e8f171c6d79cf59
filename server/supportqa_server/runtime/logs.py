"""Process logging: human-readable lines, or one JSON object per line for log collectors; the
mask that keeps card numbers, e-mail addresses and phone numbers out of logged questions."""

from __future__ import annotations

import json
import logging
import re
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and a request's fields
    (`extra={"request": {...}}`) at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            doc.update(request)
        else:
            doc["message"] = record.getMessage()
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Sends every log record to stderr at level, as text lines or JSON objects."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# What the masks replace, in this order: an e-mail's digits are not a phone number.
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")  # 13-19 digits, maybe grouped
_PHONE = re.compile(r"(?<![\w(+])[+(]?\d[\d ().-]{5,}\d(?!\d)")  # 7+ digits with separators


def mask(text: str) -> str:
    """text with card numbers, e-mail addresses and phone numbers replaced by [card],
    [email] and [phone]."""
    text = _EMAIL.sub("[email]", text)
    text = _CARD.sub("[card]", text)
    return _PHONE.sub(lambda m: "[phone]" if sum(c.isdigit() for c in m[0]) >= 7 else m[0],
                      text)
