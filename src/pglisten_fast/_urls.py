"""SQLAlchemy-style database URLs to libpq connection strings.

Applications configured for SQLAlchemy carry URLs such as
``postgresql+asyncpg://app:secret@db/app?ssl=require``; libpq (and so
psycopg and the Listener) only understands ``postgresql://`` and
``postgres://`` URLs and ``key=value`` strings.  :func:`libpq_conninfo`
turns the former into the latter, so that one setting serves both.

Rules:

* a ``key=value`` string, ``""`` and a ``postgresql://`` or ``postgres://``
  URL are returned unchanged;
* ``postgresql+<driver>://`` and ``postgres+<driver>://`` become
  ``postgresql://``; the user, password, hosts, port and database are kept
  byte for byte (percent-encoding included);
* SQLAlchemy's multi-host form ``?host=HostA:5432&host=HostB`` becomes
  libpq's ``?host=HostA,HostB&port=5432,`` (an empty port is the default);
* query parameters of drivers built on libpq (psycopg, psycopg2, ...) are
  kept: they are libpq parameters, and libpq reports unknown ones;
* query parameters of asyncpg and pg8000 are translated when libpq has an
  exact equivalent (``ssl=require`` -> ``sslmode=require``, ``timeout`` ->
  ``connect_timeout``, ``direct_tls=true`` -> ``sslnegotiation=direct``,
  pg8000's ``unix_sock`` and ``tcp_keepalive``), kept when they are libpq
  parameters already, and dropped when they only tune the driver's own
  statement cache or query timeout (nothing a LISTEN connection uses);
  any other one raises ``ValueError`` naming it;
* any other URL (``mysql+pymysql://``, ``sqlite://``...) raises
  ``ValueError("not a PostgreSQL URL: ...")`` naming the dialect.

The function is pure: no SQLAlchemy, no libpq call, no I/O.
"""

from __future__ import annotations

import math
import re
from urllib.parse import quote, unquote

__all__ = ["libpq_conninfo"]

_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.\-]*)://")
_POSTGRES_DIALECTS = frozenset({"postgresql", "postgres"})

#: Drivers that are not built on libpq: their query parameters are their own.
_NON_LIBPQ_DRIVERS = frozenset({"asyncpg", "pg8000"})

#: libpq's connection parameters (PostgreSQL 18), accepted from any driver.
LIBPQ_KEYWORDS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "password", "passfile",
    "require_auth", "channel_binding", "connect_timeout", "client_encoding",
    "options", "application_name", "fallback_application_name", "keepalives",
    "keepalives_idle", "keepalives_interval", "keepalives_count",
    "tcp_user_timeout", "replication", "gssencmode", "sslmode",
    "sslnegotiation", "sslcompression", "sslcert", "sslkey", "sslpassword",
    "sslcertmode", "sslrootcert", "sslcrl", "sslcrldir", "sslsni",
    "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version",
    "min_protocol_version", "max_protocol_version", "krbsrvname", "gsslib",
    "gssdelegation", "service", "target_session_attrs", "load_balance_hosts",
    "oauth_issuer", "oauth_client_id", "oauth_client_secret", "oauth_scope",
    "scram_client_key", "scram_server_key",
})

#: Driver options that only tune the client side of queries (statement
#: caches, per-query timeouts): meaningless for a LISTEN connection.
_CLIENT_SIDE_ONLY = {
    "asyncpg": frozenset({
        "prepared_statement_cache_size", "prepared_statement_name_func",
        "statement_cache_size", "max_cached_statement_lifetime",
        "max_cacheable_statement_size", "command_timeout",
    }),
    "pg8000": frozenset(),
}

_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_SOCKET_FILE = re.compile(r"\.s\.PGSQL\.(\d+)")


def libpq_conninfo(conninfo: str) -> str:
    """A connection string libpq understands for ``conninfo``.

    :param conninfo: a libpq ``key=value`` string or URL, or a SQLAlchemy
        URL of the PostgreSQL dialect with any driver
        (``postgresql+psycopg://``, ``postgresql+asyncpg://``...).
    :returns: ``conninfo`` itself when libpq already understands it, else
        the equivalent ``postgresql://`` URL.
    :raises ValueError: not a PostgreSQL URL, or a driver parameter without
        a libpq equivalent (the message names it).
    :raises TypeError: ``conninfo`` is not a ``str``.
    """
    if not isinstance(conninfo, str):
        raise TypeError(f"conninfo must be a str, got {type(conninfo).__name__}")
    m = _SCHEME.match(conninfo)
    if m is None:
        return conninfo  # key=value string (or "")
    scheme = m.group(1).lower()
    dialect, plus, driver = scheme.partition("+")
    if dialect not in _POSTGRES_DIALECTS:
        raise ValueError(
            f"not a PostgreSQL URL: dialect {dialect!r} in {_redact(conninfo)!r}"
        )
    if not plus:
        return conninfo  # libpq's own postgresql:// or postgres://
    if not driver:
        raise ValueError(f"empty driver name in {_redact(conninfo)!r}")

    rest = conninfo[m.end():].rstrip()
    rest, hash_, fragment = rest.partition("#")
    if hash_:
        raise ValueError(f"unexpected '#{fragment}' in {_redact(conninfo)!r}")
    authority_path, question, query = rest.partition("?")
    if not question:
        return "postgresql://" + authority_path
    given = _parse_query(query)
    params = _multihost(_translate(given, driver, conninfo), conninfo)
    if not params:
        return "postgresql://" + authority_path
    if params == given:
        return f"postgresql://{authority_path}?{query}"  # verbatim
    encoded = "&".join(f"{_q(k)}={_q(v)}" for k, v in params)
    return f"postgresql://{authority_path}?{encoded}"


def _parse_query(query: str) -> list[tuple[str, str]]:
    """``a=1&b=2`` as libpq reads it: ``%XX`` decoded, ``+`` kept as is."""
    params: list[tuple[str, str]] = []
    for item in query.split("&"):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"query parameter {unquote(key)!r} has no value")
        params.append((unquote(key), unquote(value)))
    return params


def _q(text: str) -> str:
    return quote(text, safe="/:,@")


def _translate(
    params: list[tuple[str, str]], driver: str, url: str
) -> list[tuple[str, str]]:
    """Map a non-libpq driver's query parameters to libpq's."""
    if driver not in _NON_LIBPQ_DRIVERS:
        return params  # psycopg, psycopg2...: these are libpq parameters
    out: list[tuple[str, str]] = []
    for key, value in params:
        if key in _CLIENT_SIDE_ONLY[driver]:
            continue
        mapped = _map_param(driver, key, value)
        if mapped is not None:
            out += mapped
        elif key in LIBPQ_KEYWORDS:
            out.append((key, value))
        else:
            raise ValueError(
                f"query parameter {key!r} of {driver} has no libpq equivalent "
                f"(in {_redact(url)!r}); remove it from the URL used for "
                f"pglisten_fast"
            )
    return out


def _map_param(driver: str, key: str, value: str) -> list[tuple[str, str]] | None:
    """libpq parameters for one driver parameter; None: not a mapped one."""
    low = value.strip().lower()
    if driver == "asyncpg":
        if key == "ssl":
            if low in _SSL_MODES:
                return [("sslmode", low)]
            raise ValueError(
                f"query parameter 'ssl={value}' of asyncpg: only the modes "
                f"{', '.join(_SSL_MODES)} map to libpq's sslmode"
            )
        if key == "timeout":
            return [("connect_timeout", _seconds(key, value))]
        if key == "direct_tls":
            if low in _TRUE:
                return [("sslnegotiation", "direct")]
            if low in _FALSE:
                return []
            raise ValueError(f"query parameter 'direct_tls={value}': not a boolean")
        return None
    # pg8000
    if key == "unix_sock":
        directory, _, name = value.rpartition("/")
        port = _SOCKET_FILE.fullmatch(name)
        if not directory or port is None:
            raise ValueError(
                f"query parameter 'unix_sock={value}' of pg8000: libpq needs a "
                f"socket path ending in '/.s.PGSQL.<port>'"
            )
        return [("host", directory), ("port", port.group(1))]
    if key == "tcp_keepalive":
        if low in _TRUE:
            return [("keepalives", "1")]
        if low in _FALSE:
            return [("keepalives", "0")]
        raise ValueError(f"query parameter 'tcp_keepalive={value}': not a boolean")
    if key == "timeout":
        raise ValueError(
            "query parameter 'timeout' of pg8000 (a socket timeout for every "
            "operation) has no libpq equivalent; use connect_timeout"
        )
    return None


def _seconds(key: str, value: str) -> str:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"query parameter '{key}={value}': not a number") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"query parameter '{key}={value}': must be > 0")
    return str(math.ceil(seconds))  # libpq takes whole seconds


def _multihost(params: list[tuple[str, str]], url: str) -> list[tuple[str, str]]:
    """SQLAlchemy's ``?host=A:5432&host=B`` to libpq's ``?host=A,B&port=5432,``.

    A single ``host`` without a port is left alone (libpq reads it as is,
    for example ``?host=/var/run/postgresql``).
    """
    hosts = [v for k, v in params if k == "host"]
    if not hosts or (len(hosts) == 1 and _split_port(hosts[0])[1] is None):
        return params
    names: list[str] = []
    ports: list[str] = []
    for entry in hosts:
        for item in entry.split(","):
            name, port = _split_port(item)
            names.append(name)
            ports.append(port or "")
    port_params = [v for k, v in params if k == "port"]
    if any(ports):
        if port_params:
            raise ValueError(
                f"ports given both in 'host' and in 'port' query parameters "
                f"of {_redact(url)!r}"
            )
        port_list = [("port", ",".join(ports))]
    else:
        port_list = [("port", p) for p in port_params]
    others = [(k, v) for k, v in params if k not in ("host", "port")]
    return [("host", ",".join(names)), *port_list, *others]


def _split_port(entry: str) -> tuple[str, str | None]:
    """``"db:5432"`` -> ``("db", "5432")``; ``"[::1]:5432"``; paths have none."""
    if entry.startswith("/"):
        return entry, None
    if entry.startswith("["):
        end = entry.find("]")
        if end > 0 and (entry[end + 1:] == "" or entry[end + 1] == ":"):
            port = entry[end + 2:] or None
            return entry[1:end], port
        return entry, None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, port
    return entry, None


def _redact(url: str) -> str:
    """``url`` with the password (``user:password@``) replaced by ``***``."""
    return re.sub(r"(://[^/?#@:]*:)[^/?#@]*@", r"\1***@", url.strip())
