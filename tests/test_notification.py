"""The ``Notification`` value type.

Built directly: constructor (positional and keyword fields, defaults, type
and value errors, no subclassing), ``match`` by position, immutability,
equality and hash, ``repr``, copy and pickle.  Received from a real server
(``TestReceivedFromServer``): the fields of a notification and of a marker,
immutability, and ``repr`` / equality / hash / pickle of what the listener
hands out.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from pglisten_fast._records import Notification
from tests.helpers import TIMEOUT, listen_ready

Conn = psycopg.Connection[TupleRow]


# ---------------------------------------------------------------------------
# built directly
# ---------------------------------------------------------------------------


def _package_notification() -> type | None:
    try:
        import pglisten_fast
    except Exception:
        return None
    found = getattr(pglisten_fast, "Notification", None)
    return found if isinstance(found, type) else None


def test_notification_constructor_keywords() -> None:
    n = Notification(
        channel="c",
        payload="p",
        pid=3,
        connection_reset=True,
        reason="overflow",
        dropped=9,
    )
    assert (n.channel, n.payload, n.pid, n.connection_reset, n.reason, n.dropped) == (
        "c",
        "p",
        3,
        True,
        "overflow",
        9,
    )
    d = Notification("chan")
    assert (d.channel, d.payload, d.pid, d.connection_reset, d.reason, d.dropped) == (
        "chan",
        "",
        0,
        False,
        None,
        0,
    )
    assert Notification("c", "p", 1, False) == Notification(
        channel="c", payload="p", pid=1
    )
    # All six fields may be given positionally, in attribute order.
    assert Notification("c", "", 0, True, "overflow", 4) == Notification(
        "c", connection_reset=True, reason="overflow", dropped=4
    )


def test_notification_match_args() -> None:
    match Notification("orders", "42", 7):
        case Notification(channel, payload, pid):
            assert (channel, payload, pid) == ("orders", "42", 7)
        case _:  # pragma: no cover
            pytest.fail("positional pattern did not match")


def test_notification_constructor_errors() -> None:
    with pytest.raises(TypeError):
        Notification(b"chan")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Notification(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # str, or bytes for payload_type=bytes
        Notification("c", 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Notification()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Notification("c", "", 0, True, None, 0, "extra")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Notification("c", nope=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="reason"):
        Notification("c", reason=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        Notification("c", dropped=-1)
    with pytest.raises(TypeError):
        type("Sub", (Notification,), {})


def test_notification_is_immutable() -> None:
    n = Notification("c", "p", 1)
    for attr, value in [
        ("channel", "x"),
        ("payload", "x"),
        ("pid", 2),
        ("connection_reset", True),
        ("reason", "listen"),
        ("dropped", 1),
        ("extra", 1),
    ]:
        with pytest.raises(AttributeError):
            setattr(n, attr, value)
    with pytest.raises(AttributeError):
        del n.channel
    assert (n.channel, n.payload, n.pid) == ("c", "p", 1)


def test_notification_equality_and_hash() -> None:
    a = Notification("c", "p", 1)
    b = Notification("c", "p", 1)
    assert a == b
    assert not a != b  # noqa: SIM202 - exercises __ne__
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    for other in [
        Notification("d", "p", 1),
        Notification("c", "q", 1),
        Notification("c", "p", 2),
        Notification("c", "p", 1, True),
        Notification("c", "p", 1, reason="listen"),
        Notification("c", "p", 1, dropped=1),
    ]:
        assert a != other
    assert a != ("c", "p", 1)
    m = Notification("c", "", 0, True, reason="overflow", dropped=4)
    assert hash(m) == hash(
        Notification("c", connection_reset=True, reason="overflow", dropped=4)
    )


def test_notification_repr() -> None:
    assert (
        repr(Notification("c", "p", 5))
        == "Notification(channel='c', payload='p', pid=5)"
    )
    assert (
        repr(Notification("c", connection_reset=True, reason="listen"))
        == "Notification(channel='c', connection_reset=True, reason='listen')"
    )
    assert repr(
        Notification("c", connection_reset=True, reason="overflow", dropped=3)
    ) == (
        "Notification(channel='c', connection_reset=True, reason='overflow', dropped=3)"
    )


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy])
def test_notification_copy(copier: Callable[[Notification], Notification]) -> None:
    for n in [
        Notification("c", "payload", 12),
        Notification("c", "", 0, True, reason="overflow", dropped=7),
    ]:
        c = copier(n)
        assert c == n
        assert (c.reason, c.dropped, c.connection_reset) == (
            n.reason,
            n.dropped,
            n.connection_reset,
        )


@pytest.mark.skipif(
    _package_notification() is not Notification,
    reason="pglisten_fast (package __init__) does not export Notification yet; "
    "pickle looks the type up there",
)
def test_notification_pickle_round_trip() -> None:
    for n in [
        Notification("c", "payload", 12),
        Notification("c", connection_reset=True, reason="reconnect"),
        Notification("c", connection_reset=True, reason="overflow", dropped=2**40),
    ]:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            back = pickle.loads(pickle.dumps(n, protocol))
            assert type(back) is Notification
            assert back == n
            assert (back.reason, back.dropped) == (n.reason, n.dropped)


# ---------------------------------------------------------------------------
# received from a server
# ---------------------------------------------------------------------------


class TestReceivedFromServer:
    """Notifications and markers as a listener hands them out.

    A class, so that ``test_notification_is_immutable`` can sit next to the
    test of the same name above.
    """

    def test_notification_fields(
        self, listener: pgl.Listener, conn: Conn
    ) -> None:
        sub = listen_ready(listener, "seed_fields")
        pgl.notify(conn, "seed_fields", "hello")
        n = sub.get(timeout=TIMEOUT)
        assert n.connection_reset is False
        assert n.reason is None
        assert n.dropped == 0
        assert n.channel == "seed_fields"
        assert n.payload == "hello"
        assert n.pid == conn.info.backend_pid
        assert n.pid != listener.backend_pid

    def test_notification_is_immutable(
        self, listener: pgl.Listener, conn: Conn
    ) -> None:
        sub = listen_ready(listener, "immutable")
        pgl.notify(conn, "immutable", "p")
        n = sub.get(timeout=TIMEOUT)
        for attr, value in [("channel", "x"), ("payload", "x"), ("pid", 1),
                            ("connection_reset", True), ("reason", "listen"),
                            ("dropped", 5)]:
            with pytest.raises(AttributeError):
                setattr(n, attr, value)
        with pytest.raises((AttributeError, TypeError)):
            n.extra = 1  # type: ignore[attr-defined]
        with pytest.raises((AttributeError, TypeError)):
            del n.payload
        assert n.payload == "p"

    def test_notification_repr_eq_hash_pickle(
        self, listener: pgl.Listener, conn: Conn
    ) -> None:
        sub = listener.listen("obj")
        marker = sub.get(timeout=TIMEOUT)
        pgl.notify(conn, "obj", "payload 'q'")
        n = sub.get(timeout=TIMEOUT)

        assert repr(n) == (
            f"Notification(channel='obj', payload=\"payload 'q'\", pid={n.pid})")
        assert repr(marker) == (
            "Notification(channel='obj', connection_reset=True, reason='listen')")
        # The repr is also valid constructor syntax.
        for item in (n, marker):
            assert eval(repr(item), {"Notification": pgl.Notification}) == item

        same = pgl.Notification("obj", "payload 'q'", n.pid)
        assert same == n
        assert hash(same) == hash(n)
        assert n != pgl.Notification("obj", "other", n.pid)
        assert n != pgl.Notification("other", "payload 'q'", n.pid)
        assert n != pgl.Notification("obj", "payload 'q'", n.pid + 1)
        assert marker == pgl.Notification("obj", "", 0, True, reason="listen")
        assert marker != n
        assert len({n, same, marker}) == 2
        assert n != ("obj", "payload 'q'", n.pid)

        for item in (n, marker, pgl.Notification("c", "", 0, True, reason="overflow",
                                                 dropped=7)):
            clone = pickle.loads(pickle.dumps(item))
            assert clone == item
            assert type(clone) is pgl.Notification
            assert (clone.channel, clone.payload, clone.pid, clone.connection_reset,
                    clone.reason, clone.dropped) == (
                item.channel, item.payload, item.pid, item.connection_reset,
                item.reason, item.dropped)
