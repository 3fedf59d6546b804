"""Log set-up and masking helpers: no personal data reaches a log line in clear.

Two formats (CARDCHECK_LOG_FORMAT): `text`, a readable line for a console, and `json`, one
object a line for a log pipeline, with the trace and span of the call it was written in, so
that a line leads to its trace. The JSON is the standard library's: a formatter of a few lines
gives exactly these keys, where python-json-logger would be one more dependency to configure
into the same shape."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

TEXT, JSON = "text", "json"


class JsonFormatter(logging.Formatter):
    """time (RFC 3339, UTC), level, service, logger, message; `exception` when there is one;
    `trace_id` and `span_id` (hex, as OpenTelemetry writes them) inside a span."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = trace.format_trace_id(context.trace_id)
            line["span_id"] = trace.format_span_id(context.span_id)
        return json.dumps(line, ensure_ascii=False)


def formatter(service: str, log_format: str = TEXT) -> logging.Formatter:
    if log_format == JSON:
        return JsonFormatter(service)
    return logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")


def setup_logging(service: str, level: str = "INFO", log_format: str = TEXT) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(service, log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def mask_phone(phone: str) -> str:
    """138****5678: enough for an engineer to tell numbers apart, not enough to call one."""
    if len(phone) < 7:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 7) + phone[-4:]
