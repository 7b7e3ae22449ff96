"""Shared pytest configuration: fixtures live in the fix_* plugins."""

from __future__ import annotations

pytest_plugins = ("tests.fix_db", "tests.fix_proxy", "tests.fix_pgbouncer")
