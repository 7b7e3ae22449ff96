"""``python -m pglisten_fast.cli``: the same program as ``python -m pglisten_fast``."""

from __future__ import annotations

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
