"""Validation of channel names and payloads (shared by listen and notify)."""

from __future__ import annotations

__all__ = ["MAX_NAME_BYTES", "MAX_PAYLOAD_BYTES", "check_channel", "check_payload"]

#: PostgreSQL identifiers are at most NAMEDATALEN - 1 = 63 bytes; longer
#: names are silently truncated by the server, so they are refused here.
MAX_NAME_BYTES = 63
#: A NOTIFY payload must be shorter than 8000 bytes (PostgreSQL's default).
MAX_PAYLOAD_BYTES = 7999


def check_channel(name: object) -> str:
    """Return ``name`` if it is a usable channel name.

    :raises TypeError: not a ``str``.
    :raises ValueError: empty, contains NUL or a lone surrogate, or longer than
        63 bytes in UTF-8.
    """
    if not isinstance(name, str):
        raise TypeError(f"channel names must be str, got {type(name).__name__}")
    if not name:
        raise ValueError("channel name must not be empty")
    if "\x00" in name:
        raise ValueError(f"channel name must not contain NUL: {name!r}")
    try:
        n = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"channel name is not valid Unicode: {name!r}") from None
    if n > MAX_NAME_BYTES:
        raise ValueError(
            f"channel name is {n} bytes in UTF-8; PostgreSQL allows at most "
            f"{MAX_NAME_BYTES} (it would silently truncate it): {name!r}"
        )
    return name


def check_payload(payload: object, encoding: str = "utf-8") -> bytes:
    """Return ``payload`` encoded if PostgreSQL will accept it.

    :raises TypeError: not a ``str``.
    :raises ValueError: contains NUL or is 8000 bytes or longer once encoded.
    """
    if not isinstance(payload, str):
        raise TypeError(f"payloads must be str, got {type(payload).__name__}")
    if "\x00" in payload:
        raise ValueError("payload must not contain NUL")
    data = payload.encode(encoding)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"payload is {len(data)} bytes; PostgreSQL allows at most "
            f"{MAX_PAYLOAD_BYTES} bytes"
        )
    return data
