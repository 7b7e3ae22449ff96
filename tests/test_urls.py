"""SQLAlchemy-style URLs translated to libpq connection strings."""

from __future__ import annotations

from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pglisten_fast._urls import libpq_conninfo

UNCHANGED = [
    "",
    "dbname=app",
    "host=db port=5433 user=app dbname=app sslmode=require",
    "host=/var/run/postgresql dbname=app options='-c x=1'",
    "postgresql://app:secret@db:5432/app?sslmode=require",
    "postgres://db/app",
    "postgresql://",
    "postgresql://h1:5432,h2:5433/app?target_session_attrs=read-write",
]

TRANSLATED = [
    # any driver of the PostgreSQL dialect: the scheme changes, nothing else
    ("postgresql+psycopg://u:p@h:5432/db?sslmode=require",
     "postgresql://u:p@h:5432/db?sslmode=require"),
    ("postgresql+psycopg2://u:p@h/db", "postgresql://u:p@h/db"),
    ("postgresql+psycopg2cffi://u@h/db", "postgresql://u@h/db"),
    ("postgres+psycopg://u@h/db", "postgresql://u@h/db"),
    ("PostgreSQL+Psycopg://u@h/db", "postgresql://u@h/db"),
    ("postgresql+pg8000://u:p@h:5433/db", "postgresql://u:p@h:5433/db"),
    ("postgresql+asyncpg://u:p@h/db", "postgresql://u:p@h/db"),
    ("postgresql+psycopg://", "postgresql://"),
    ("  postgresql+psycopg://h/db  ", "postgresql://h/db"),
    # percent-encoding and libpq's literal '+' are kept byte for byte
    ("postgresql+psycopg://u%40corp:p%2Fw%3A@h/d%20b?application_name=a+b%20c",
     "postgresql://u%40corp:p%2Fw%3A@h/d%20b?application_name=a+b%20c"),
    ("postgresql+psycopg://h/db?", "postgresql://h/db"),
    # libpq drivers: every query parameter is libpq's, kept verbatim
    ("postgresql+psycopg2://u@/db?host=/var/run/postgresql&options=-c%20x%3D1",
     "postgresql://u@/db?host=/var/run/postgresql&options=-c%20x%3D1"),
    ("postgresql+psycopg://h/db?not_a_libpq_param=1",
     "postgresql://h/db?not_a_libpq_param=1"),  # libpq reports it
    # SQLAlchemy's multi-host form
    ("postgresql+psycopg2://u:p@/db?host=HostA:5432&host=HostB&host=HostC:5434",
     "postgresql://u:p@/db?host=HostA,HostB,HostC&port=5432,,5434"),
    ("postgresql+psycopg://u@/db?host=a&host=b&port=6000&target_session_attrs=any",
     "postgresql://u@/db?host=a,b&port=6000&target_session_attrs=any"),
    ("postgresql+asyncpg://u@/db?host=[::1]:5432&host=db",
     "postgresql://u@/db?host=::1,db&port=5432,"),
    ("postgresql+psycopg://u@/db?host=db:5433", "postgresql://u@/db?host=db&port=5433"),
    # asyncpg: exact equivalents are mapped
    ("postgresql+asyncpg://u:p@h:5432/db?ssl=require",
     "postgresql://u:p@h:5432/db?sslmode=require"),
    ("postgresql+asyncpg://h/db?ssl=verify-full&sslrootcert=/ca.pem",
     "postgresql://h/db?sslmode=verify-full&sslrootcert=/ca.pem"),
    ("postgresql+asyncpg://h/db?ssl=DISABLE", "postgresql://h/db?sslmode=disable"),
    ("postgresql+asyncpg://h/db?timeout=2.5", "postgresql://h/db?connect_timeout=3"),
    ("postgresql+asyncpg://h/db?direct_tls=true&ssl=require",
     "postgresql://h/db?sslnegotiation=direct&sslmode=require"),
    ("postgresql+asyncpg://h/db?direct_tls=false", "postgresql://h/db"),
    ("postgresql+asyncpg://h/db?target_session_attrs=primary&passfile=/p",
     "postgresql://h/db?target_session_attrs=primary&passfile=/p"),
    # asyncpg: client-side statement cache and query timeout are dropped
    ("postgresql+asyncpg://h/db?prepared_statement_cache_size=0"
     "&statement_cache_size=0&command_timeout=30&application_name=web",
     "postgresql://h/db?application_name=web"),
    # pg8000
    ("postgresql+pg8000://u@/db?unix_sock=/run/postgresql/.s.PGSQL.5433",
     "postgresql://u@/db?host=/run/postgresql&port=5433"),
    ("postgresql+pg8000://h/db?tcp_keepalive=false&application_name=x",
     "postgresql://h/db?keepalives=0&application_name=x"),
]

REFUSED = [
    ("mysql+pymysql://u:secret@h/db", "not a PostgreSQL URL: dialect 'mysql'"),
    ("mysql://h/db", "not a PostgreSQL URL: dialect 'mysql'"),
    ("sqlite://", "not a PostgreSQL URL: dialect 'sqlite'"),
    ("sqlite:///tmp/app.db", "not a PostgreSQL URL: dialect 'sqlite'"),
    ("mssql+pyodbc://h/db", "dialect 'mssql'"),
    ("cockroachdb+psycopg://h/db", "dialect 'cockroachdb'"),
    ("postgresqlx://h/db", "dialect 'postgresqlx'"),
    ("postgresql+://h/db", "empty driver name"),
    ("postgresql+asyncpg://h/db?ssl=true", "'ssl=true'"),
    ("postgresql+asyncpg://h/db?ssl=maybe", "'ssl=maybe'"),
    ("postgresql+asyncpg://h/db?server_settings=x", "'server_settings'"),
    ("postgresql+asyncpg://h/db?timeout=soon", "'timeout=soon'"),
    ("postgresql+asyncpg://h/db?timeout=0", "'timeout=0'"),
    ("postgresql+asyncpg://h/db?direct_tls=perhaps", "'direct_tls=perhaps'"),
    ("postgresql+pg8000://h/db?timeout=5", "'timeout' of pg8000"),
    ("postgresql+pg8000://h/db?source_address=10.0.0.1", "'source_address'"),
    ("postgresql+pg8000://h/db?unix_sock=/tmp/pg.sock", "'unix_sock=/tmp/pg.sock'"),
    ("postgresql+pg8000://h/db?tcp_keepalive=sometimes", "'tcp_keepalive"),
    ("postgresql+psycopg://h/db?host=a:1&host=b&port=5", "ports given both"),
    ("postgresql+psycopg://h/db?sslmode", "'sslmode' has no value"),
    ("postgresql+psycopg://h/db#frag", "'#frag'"),
]


@pytest.mark.parametrize("conninfo", UNCHANGED)
def test_libpq_strings_and_urls_are_unchanged(conninfo: str) -> None:
    assert libpq_conninfo(conninfo) is conninfo


@pytest.mark.parametrize(("url", "expected"), TRANSLATED)
def test_driver_urls_become_libpq_urls(url: str, expected: str) -> None:
    out = libpq_conninfo(url)
    assert out == expected
    if "not_a_libpq_param" in out:
        with pytest.raises(psycopg.ProgrammingError, match="not_a_libpq_param"):
            conninfo_to_dict(out)  # libpq names the unknown parameter
    elif "sslnegotiation" not in out or psycopg.pq.version() >= 170000:
        conninfo_to_dict(out)  # libpq parses it
    assert libpq_conninfo(out) == out  # idempotent


@pytest.mark.parametrize(("url", "message"), REFUSED)
def test_other_urls_and_untranslatable_parameters_are_refused(
    url: str, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        libpq_conninfo(url)
    assert message in str(info.value)


def test_the_password_is_not_in_error_messages() -> None:
    with pytest.raises(ValueError) as info:
        libpq_conninfo("mysql+pymysql://app:hunter2@db/app")
    assert "hunter2" not in str(info.value)
    assert "app:***@db" in str(info.value)
    with pytest.raises(ValueError) as info:
        libpq_conninfo("postgresql+asyncpg://app:hunter2@db/app?foo=1")
    assert "hunter2" not in str(info.value)


def test_translated_values_mean_the_same_to_libpq() -> None:
    got = conninfo_to_dict(libpq_conninfo(
        "postgresql+asyncpg://app:p%40ss@db:6432/app?ssl=verify-ca&timeout=7"
    ))
    assert got == {
        "user": "app", "password": "p@ss", "host": "db", "port": "6432",
        "dbname": "app", "sslmode": "verify-ca", "connect_timeout": "7",
    }
    got = conninfo_to_dict(libpq_conninfo(
        "postgresql+psycopg2://u@/db?host=HostA:5432&host=HostB"
        "&options=-c%20search_path%3Dx"
    ))
    assert got == {
        "user": "u", "dbname": "db", "host": "HostA,HostB", "port": "5432,",
        "options": "-c search_path=x",
    }


def test_not_a_string() -> None:
    with pytest.raises(TypeError):
        libpq_conninfo(b"postgresql://h/db")  # type: ignore[arg-type]


def _sqlalchemy_url(dsn: str, driver: str) -> str:
    """The test server's DSN written the way SQLAlchemy users write it."""
    params = conninfo_to_dict(dsn)
    user = quote(str(params.pop("user", "")), safe="")
    password = params.pop("password", None)
    auth = f"{user}:{quote(str(password), safe='')}@" if password else f"{user}@"
    host = str(params.pop("host", ""))
    port = str(params.pop("port", ""))
    dbname = quote(str(params.pop("dbname", "")), safe="")
    if host.startswith("/"):  # a socket directory: SQLAlchemy's ?host= form
        params["host"] = host + (f":{port}" if port else "")
        netloc = auth
    else:
        netloc = auth + host + (f":{port}" if port else "")
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
    return f"postgresql+{driver}://{netloc}/{dbname}" + (f"?{query}" if query else "")


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2", "asyncpg"])
def test_a_translated_url_connects(dsn: str, driver: str) -> None:
    url = _sqlalchemy_url(dsn, driver)
    with psycopg.connect(libpq_conninfo(url), connect_timeout=10) as conn:
        row = conn.execute("SELECT current_database(), current_user").fetchone()
    expected = conninfo_to_dict(dsn)
    assert row is not None
    if "dbname" in expected:
        assert row[0] == expected["dbname"]
    if "user" in expected:
        assert row[1] == expected["user"]


def test_a_multi_host_url_connects(dsn: str) -> None:
    params = conninfo_to_dict(dsn)
    host, port = str(params["host"]), str(params.get("port", "5432"))
    if host.startswith("/"):
        pytest.skip("the test server listens on a socket directory")
    user, dbname = params.get("user", ""), params.get("dbname", "")
    # The first host refuses connections; libpq goes on to the second one.
    url = (f"postgresql+psycopg://{user}@/{dbname}?host=127.0.0.1:1"
           f"&host={host}:{port}&connect_timeout=5")
    if "password" in params:
        url += f"&password={quote(str(params['password']), safe='')}"
    with psycopg.connect(libpq_conninfo(url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_listener_takes_a_sqlalchemy_url(dsn: str) -> None:
    import pglisten_fast as pgl

    url = _sqlalchemy_url(dsn, "asyncpg")
    with pgl.Listener(url) as listener:
        assert listener.connected
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        pgl.Listener("mysql+pymysql://u@h/db")
