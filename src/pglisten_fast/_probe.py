"""Delivery probes: proof that the listener's session really receives.

Behind a connection pooler the listener cannot see which server session
its LISTEN ran in.  A transaction pooler hands that session to other
clients between transactions, so notifications stop reaching the
listener while everything else (queries, pings) keeps working.  A
session receives its *own* notifications before its ReadyForQuery, so a
probe sent on the listener's session would pass even then; the proof must
come from another session.

:class:`Prober` keeps that second session (opened from the listener's
own connection source) on a helper thread and sends
``pg_notify(<private channel>, <token>)`` on request.  The selector thread
LISTENs the private channel and waits for the token: it arrives only when
notifications committed elsewhere reach the listener's session.  Each
probe costs one NOTIFY (a commit that takes the server's notify lock) and
the second session stays open while the listener is pooled.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._commands import SubSpec
from ._connect import SessionLost, Source, describe
from ._log import fields, logger
from ._ring import MIN_CAPACITY, Ring, WakeFd

__all__ = ["DeliveryCheck", "Prober", "probe_channel"]



def probe_channel() -> str:
    """A private channel name for one listener's probes (< 63 bytes)."""
    return "pglisten_fast.probe." + secrets.token_hex(8)


class Prober:
    """Sends probe notifications from a second session, off the selector thread.

    :param source: where the second session comes from.
    :param channel: the private probe channel.
    :param wake: called (from the helper thread) when a send failed.
    """

    def __init__(self, source: Source, channel: str,
                 wake: Callable[[], None]) -> None:
        self.channel = channel
        self._source = source
        self._wake = wake
        self._cv = threading.Condition()
        self._tokens: deque[str] = deque()
        self._closed = False
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    def send(self, token: str) -> None:
        """Queue a probe carrying ``token`` (returns at once)."""
        with self._cv:
            if self._closed:
                return
            self._tokens.append(token)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pglisten-fast-probe", daemon=True)
                self._thread.start()
            self._cv.notify()

    def take_error(self) -> str | None:
        """The last send failure since the previous call, or None."""
        with self._cv:
            err, self._error = self._error, None
            return err

    def close(self) -> None:
        """Stop the helper thread; it closes the second session."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _run(self) -> None:
        conn: Any = None
        while True:
            with self._cv:
                while not self._tokens and not self._closed:
                    self._cv.wait()
                if self._closed:
                    break
                token = self._tokens.popleft()
            try:
                try:
                    conn = self._send(conn, token)
                except Exception:
                    if conn is None:
                        raise
                    # The kept session may have gone stale (a pooler or
                    # server restart): one more try on a new one.
                    self._source.release(conn)
                    conn = None
                    conn = self._send(None, token)
            except Exception as e:
                logger.debug("delivery probe failed", exc_info=True,
                             extra=fields("probe_failed",
                                          error_class=type(e).__name__))
                with self._cv:
                    self._error = describe(e)
                if conn is not None:
                    self._source.release(conn)
                    conn = None
                self._wake()
        if conn is not None:
            self._source.release(conn)

    def _send(self, conn: Any, token: str) -> Any:
        """Send one probe, opening the session if needed; returns it.

        A session opened here and failing at once is released here.
        """
        fresh = conn is None
        if fresh:
            conn = self._source.connect()
        try:
            if fresh:
                conn.autocommit = True
            conn.execute("SELECT pg_notify(%s, %s)", (self.channel, token),
                         prepare=False)
        except Exception:
            if fresh:
                self._source.release(conn)
            raise
        return conn


class DeliveryCheck:
    """The selector thread's side of the probes, for one listener.

    :param mode: None: probe only behind a pooler; True: always; False:
        never.
    :param timeout: seconds a probe may take to arrive.
    """

    def __init__(self, source: Source, wake: WakeFd, mode: bool | None,
                 timeout: float) -> None:
        self.mode = mode
        self.timeout = timeout
        channel = probe_channel()
        # Its consumer is the selector thread itself: the router signals the
        # selector's own wake-up fd when a probe lands.
        self.spec = SubSpec((channel,), Ring(MIN_CAPACITY, consumer_wake=wake),
                            block=False)
        self.registered = False
        self._prober = Prober(source, channel, wake.signal)
        self.active = False      # probes are used on this connection
        self.proven = False      # delivery proven on this connection
        self._token: str | None = None
        self.deadline: float | None = None
        self._sent_at = 0.0

    def begin(self, pooled: bool) -> None:
        """A new connection: decide whether it needs proving."""
        self.active = self.mode is True or (self.mode is None and pooled)
        self.proven = not self.active
        self._token = None
        self.deadline = None

    @property
    def pending(self) -> bool:
        return self._token is not None

    def send(self, now: float) -> None:
        """Send a probe; it must arrive before :attr:`deadline`."""
        self._token = secrets.token_hex(8)
        self._sent_at = now
        self.deadline = now + self.timeout
        self._drain()          # forget older probes; arm the wake-up
        self._prober.send(self._token)

    def arrived(self) -> bool:
        """Whether the pending probe arrived (selector thread, after a wake-up).

        :raises SessionLost: the probe could not be sent.
        """
        err = self._prober.take_error()
        if err is not None:
            raise SessionLost(
                f"cannot send a delivery probe from a second session ({err})")
        if self._token is None or not self._drain():
            return False
        self._token = None
        self.deadline = None
        logger.debug("delivery probe arrived after %.1f ms",
                     (time.monotonic() - self._sent_at) * 1000,
                     extra=fields("probe_arrived"))
        return True

    def overdue(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _drain(self) -> bool:
        """Consume the probe ring; True if the pending token was in it."""
        ring = self.spec.ring
        found = False
        while True:
            for n in ring.drain(self.spec.channels, 64):
                found = found or (n.payload == self._token and not n.connection_reset)
            # Ask the router to signal the selector at the next write; True
            # means records came meanwhile: look again.
            if ring.closed or not ring.consumer_wait_arm():
                return found

    def close(self) -> None:
        self._prober.close()
