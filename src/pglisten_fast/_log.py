"""The library's logger and the structured fields of its records.

Every record of logger ``pglisten_fast`` carries ``extra`` fields, so that
JSON log formatters get them without parsing the text:

``event``
    what happened: ``connected``, ``connect_failed``, ``connection_lost``,
    ``pooler_detected``, ``delivery_proven``, ``probe_arrived``,
    ``probe_failed``, ``listen_refused``, ``listen_batch_refused``,
    ``listen_synced``, ``block_paused``, ``queue_high``, ``queue_normal``,
    ``handler_error``, ``read_path``, ``internal_error``, ``close_failed``;
``backend_pid``
    the listening backend's pid, where known;
``channel``
    the channel concerned, where one is;
``retry_delay``
    seconds until the next connection attempt;
``error_class``
    the class name of the underlying error;
``queue_usage``
    the server's notification queue usage (0-1).

Messages stay readable on their own.
"""

from __future__ import annotations

import logging

__all__ = ["FIELDS", "fields", "logger"]

logger = logging.getLogger("pglisten_fast")

#: Names of the structured fields (besides ``event``).
FIELDS = ("backend_pid", "channel", "retry_delay", "error_class", "queue_usage")


def fields(event: str, **values: object) -> dict[str, object]:
    """``extra=`` for a log call: ``event`` plus the values that are known."""
    out: dict[str, object] = {"event": event}
    for k, v in values.items():
        if v is not None:
            out[k] = v
    return out
