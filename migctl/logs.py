"""Logging as the settings say: JSON lines for machines, plain text for people. Every
handler redacts secrets and carries the pool, job and VM ids where known (migctl.redact)."""

from __future__ import annotations

import json
import logging
import sys
import time

from migctl.redact import FIELDS, install
from migctl.settings import Settings

CONSOLE = "%(asctime)s %(levelname)s %(name)s [%(pool_id)s %(job_id)s %(vm_id)s]: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            if value := getattr(record, name, ""):
                out[name] = value
        # The redaction filter has already formatted (and cleaned) the traceback.
        if record.exc_text or record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(out)


def level_of(settings: Settings) -> str:
    level = settings.logging.level.upper()
    return "WARNING" if level == "WARN" else level


def formatter_for(settings: Settings) -> logging.Formatter:
    if settings.logging.format == "json":
        return JsonFormatter()
    return logging.Formatter(CONSOLE, defaults={name: "-" for name in FIELDS})


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(settings))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_of(settings))
    install(settings.pool.id)
