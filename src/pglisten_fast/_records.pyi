"""Type stub of the C extension ``pglisten_fast._records`` (csrc/pglf_records.c)."""

from typing import Final, final

@final
class Notification:
    """One notification received on a channel, or a marker (immutable)."""

    __match_args__: Final = ("channel", "payload", "pid")

    @property
    def channel(self) -> str:
        """Channel the notification was sent on."""
    @property
    def payload(self) -> str:
        """Payload decoded with the client encoding; "" on markers.

        On subscriptions made with ``payload_type=bytes`` this is ``bytes``
        (undecoded; b"" on markers): type checkers see ``str``, use
        ``typing.cast(bytes, n.payload)`` there.
        """
    @property
    def pid(self) -> int:
        """Process id of the sending backend; 0 on markers."""
    @property
    def connection_reset(self) -> bool:
        """True on markers: state may have been missed; reload it."""
    @property
    def reason(self) -> str | None:
        """"listen", "reconnect" or "overflow" on markers, else None."""
    @property
    def dropped(self) -> int:
        """On overflow markers: notifications lost at this point; else 0."""
    def __init__(
        self,
        channel: str,
        payload: str | bytes = "",
        pid: int = 0,
        connection_reset: bool = False,
        reason: str | None = None,
        dropped: int = 0,
    ) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

#: Ring layout this extension was built with (compared with the cffi module's).
RING_ABI: int

def drain(
    ring_address: int,
    channels: tuple[str, ...],
    max_items: int,
    encoding: str | None = None,
    raw: bool = False,
    /,
) -> list[Notification]: ...
def take(
    ring_address: int,
    channels: tuple[str, ...],
    max_items: int,
    timeout_ms: int,
    raw: bool,
    /,
) -> list[Notification] | int: ...
