"""``python -m pglisten_fast``: the ``pglisten-fast`` command line (see :mod:`.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
