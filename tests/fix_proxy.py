"""Pytest plugin: a TCP proxy in front of the test server, to break connections.

Enabled from ``tests/conftest.py`` with ``pytest_plugins``.  The ``proxy``
fixture yields a started :class:`Proxy` forwarding to the ``pg_server``;
connect through ``proxy.dsn`` and then:

``proxy.blackhole()``
    every byte in both directions is silently dropped and new connections are
    accepted but never reach the server - like a network path that loses
    packets without sending a reset.  The proxy's own kernel still
    acknowledges TCP segments, so TCP keepalives do *not* detect this; only an
    application-level timeout does.
``proxy.restore()``
    new connections are forwarded again (blackholed ones stay dead).
``proxy.disconnect()``
    all current connections are reset (RST) on both sides.

The proxy runs one daemon thread driving non-blocking sockets with
:mod:`selectors`; control methods run inside that thread and return once the
change is in effect.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.fix_db import PgServer

_T = TypeVar("_T")

_CHUNK = 65536
_MAX_PENDING = 4 * 1024 * 1024  # per direction, before we stop reading the source
_MAX_CONNECTIONS = 256
_CONTROL_TIMEOUT = 10.0


def _abort(sock: socket.socket) -> None:
    """Close *sock* with an RST instead of an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Pair:
    """One client connection and, unless blackholed from the start, its upstream."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.dead = upstream is None  # blackholed: read and discard everything
        self.pending: dict[socket.socket, bytearray] = {client: bytearray()}
        if upstream is not None:
            self.pending[upstream] = bytearray()
        self.eof = False  # one side closed: finish flushing, then close

    def peer(self, sock: socket.socket) -> socket.socket | None:
        return self.upstream if sock is self.client else self.client

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]


class Proxy:
    """TCP proxy on ``127.0.0.1:<free port>`` forwarding to ``target_host:target_port``.

    Args:
        target_host: server address.
        target_port: server port.
        base_dsn: connection string whose host/port :attr:`dsn` replaces;
            defaults to ``user=postgres dbname=postgres``.
    """

    def __init__(
        self, target_host: str, target_port: int, base_dsn: str | None = None
    ) -> None:
        self.target = (target_host, target_port)
        self._base_dsn = (
            base_dsn if base_dsn is not None else "user=postgres dbname=postgres"
        )
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._pairs: set[_Pair] = set()
        self._blackholed = False
        self._running = False
        self._port: int | None = None
        self._error: BaseException | None = None

    # -- public API ---------------------------------------------------------

    @property
    def port(self) -> int:
        """Port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    @property
    def dsn(self) -> str:
        """The base connection string pointed at the proxy."""
        params = conninfo_to_dict(self._base_dsn)
        params.pop("hostaddr", None)
        params["host"] = "127.0.0.1"
        params["port"] = str(self.port)
        return make_conninfo("", **params)

    @property
    def connection_count(self) -> int:
        """Number of client connections currently open through the proxy."""
        return self._call(lambda: len(self._pairs))

    def start(self) -> Proxy:
        """Start listening and forwarding; returns *self*."""
        if self._running:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._running = True
        self._thread = threading.Thread(
            target=self._loop, name=f"pg-proxy-{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join the thread (idempotent)."""
        if not self._running or self._thread is None:
            return
        try:
            self._call(self._shutdown)
        finally:
            self._thread.join(_CONTROL_TIMEOUT)
            self._running = False
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            if self._selector is not None:
                self._selector.close()

    def blackhole(self) -> None:
        """Silently drop all traffic of current and new connections."""

        def apply() -> None:
            self._blackholed = True
            for pair in self._pairs:
                pair.dead = True
                for buf in pair.pending.values():
                    buf.clear()
                self._update(pair)

        self._call(apply)

    def restore(self) -> None:
        """Forward new connections again; already blackholed ones stay dead."""

        def apply() -> None:
            self._blackholed = False

        self._call(apply)

    def disconnect(self) -> None:
        """Reset (RST) every current connection, on the client and the server side."""

        def apply() -> None:
            for pair in list(self._pairs):
                self._close_pair(pair, abort=True)

        self._call(apply)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Proxy 127.0.0.1:{self._port} -> {self.target[0]}:{self.target[1]}>"

    # -- control channel ----------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run *fn* in the proxy thread and return its result."""
        if not self._running or self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"proxy is not running (thread error: {self._error!r})")
        done = threading.Event()
        result: list[_T] = []
        failure: list[BaseException] = []

        def command() -> None:
            try:
                result.append(fn())
            except BaseException as exc:  # handed back to the caller
                failure.append(exc)
            finally:
                done.set()

        self._commands.put(command)
        assert self._wake_w is not None
        self._wake_w.send(b"x")
        if not done.wait(_CONTROL_TIMEOUT):
            raise RuntimeError("proxy thread did not answer in time")
        if failure:
            raise failure[0]
        return result[0]

    # -- event loop (proxy thread only) ---------------------------------------

    def _loop(self) -> None:
        assert self._selector is not None
        try:
            while self._running:
                for key, events in self._selector.select(timeout=1.0):
                    if key.fileobj is self._wake_r:
                        self._drain_commands()
                    elif key.fileobj is self._listener:
                        self._accept()
                    else:
                        pair: _Pair | None = key.data
                        if pair is None or pair not in self._pairs:
                            continue  # closed earlier in this round
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if events & selectors.EVENT_WRITE:
                            self._flush(pair, sock)
                        if pair in self._pairs and events & selectors.EVENT_READ:
                            self._read(pair, sock)
        except BaseException as exc:  # reported through _call
            self._error = exc
            self._shutdown()
            raise

    def _drain_commands(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _shutdown(self) -> None:
        for pair in list(self._pairs):
            self._close_pair(pair, abort=True)
        if self._listener is not None:
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        self._running = False

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._pairs) >= _MAX_CONNECTIONS:
            _abort(client)
            return
        upstream: socket.socket | None = None
        if not self._blackholed:
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _abort(client)  # server down: the client sees a reset
                return
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setblocking(False)
        pair = _Pair(client, upstream)
        self._pairs.add(pair)
        assert self._selector is not None
        for sock in pair.sockets():
            self._selector.register(sock, selectors.EVENT_READ, pair)

    def _update(self, pair: _Pair) -> None:
        """Recompute which events each socket of *pair* waits for."""
        assert self._selector is not None
        for sock in pair.sockets():
            events = 0
            if pair.pending[sock]:
                events |= selectors.EVENT_WRITE
            peer = pair.peer(sock)
            peer_backlog = len(pair.pending[peer]) if peer is not None else 0
            if not pair.eof and (pair.dead or peer_backlog < _MAX_PENDING):
                events |= selectors.EVENT_READ
            key = self._selector.get_map().get(sock)
            if not events:
                if key is not None:  # nothing to wait for until the peer drains
                    self._selector.unregister(sock)
            elif key is None:
                self._selector.register(sock, events, pair)
            elif key.events != events:
                self._selector.modify(sock, events, pair)

    def _read(self, pair: _Pair, sock: socket.socket) -> None:
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_pair(pair, abort=True)
            return
        if not data:
            if pair.dead:
                self._close_pair(pair, abort=False)
                return
            pair.eof = True
            if not any(pair.pending.values()):
                self._close_pair(pair, abort=False)
            else:
                self._update(pair)
            return
        if pair.dead:
            return  # blackholed: drop it
        peer = pair.peer(sock)
        assert peer is not None
        pair.pending[peer] += data
        self._flush(pair, peer)

    def _flush(self, pair: _Pair, sock: socket.socket) -> None:
        buf = pair.pending[sock]
        if buf and not pair.dead:
            try:
                sent = sock.send(buf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close_pair(pair, abort=True)
                return
            del buf[:sent]
        if pair.eof and not any(pair.pending.values()):
            self._close_pair(pair, abort=False)
            return
        self._update(pair)

    def _close_pair(self, pair: _Pair, *, abort: bool) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        for sock in pair.sockets():
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
            if abort:
                _abort(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def server_address(dsn: str) -> tuple[str, int]:
    """The TCP address a connection to *dsn* actually reaches."""
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        host, port = conn.info.host, conn.info.port
        hostaddr = conn.info.hostaddr
    if host.startswith(("/", "@")):
        pytest.skip(
            "the test server is reachable only through a Unix socket: no TCP proxy"
        )
    return (hostaddr or host, port)


@pytest.fixture
def proxy(pg_server: PgServer) -> Iterator[Proxy]:
    """A started :class:`Proxy` in front of the test server, stopped afterwards."""
    host, port = server_address(pg_server.dsn)
    instance = Proxy(host, port, base_dsn=pg_server.dsn)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
