#!/usr/bin/env bash
# check_wheel.sh - build the wheel, check that neither extension is linked
# with libpq, install it next to psycopg from PyPI in a fresh virtualenv,
# and run scripts/c_path_smoke.py there: the C read path must be chosen and
# carry a LISTEN/NOTIFY round trip, under psycopg's own implementation and
# under its pure-Python one, with one or two libpqs loaded.
#
# Usage (from anywhere): scripts/check_wheel.sh [PSYCOPG_REQUIREMENT ...]
#   PSYCOPG_REQUIREMENT  pip requirement for psycopg, one virtualenv each
#                        (default: 'psycopg[binary]'; e.g. 'psycopg[c]',
#                        'psycopg[binary]==3.1.*')
# Environment: PYTHON (default python3), PGLISTEN_FAST_TEST_DSN (a server to
# use; default: a throwaway cluster from pglisten_fast.testing, which needs
# the PostgreSQL server binaries), KEEP=1 keeps the work directory.
#
# Needs network access to PyPI (psycopg, cffi and the build requirements),
# gcc and Python headers; no libpq headers.  readelf (binutils) is used when
# present.  Exits non-zero on the first failure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [ "$#" -eq 0 ]; then
    set -- 'psycopg[binary]'
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pglf-wheel.XXXXXX")
if [ "${KEEP:-}" = 1 ]; then
    echo "check_wheel.sh: work directory $WORK (kept)"
else
    trap 'rm -rf "$WORK"' EXIT
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

echo "== build the wheel"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/pglisten_fast-*.whl)
echo "$(basename "$WHEEL")"

echo "== shared objects of the wheel"
mkdir -p "$WORK/unpacked"
"$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$WHEEL" "$WORK/unpacked"
mapfile -t SOS < <(find "$WORK/unpacked" -name '*.so' | sort)
if [ "${#SOS[@]}" -ne 2 ]; then
    echo "check_wheel.sh: expected 2 extension modules in the wheel, found ${#SOS[@]}" >&2
    exit 1
fi
for so in "${SOS[@]}"; do
    if command -v readelf >/dev/null 2>&1; then
        needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | paste -sd ' ' -)
        echo "$(basename "$so"): NEEDED $needed"
        linked=$(grep -ci libpq <<<"$needed" || true)
    else
        echo "$(basename "$so"): readelf not found, looking for a libpq name in the file"
        linked=$(grep -ca 'libpq\.so' "$so" || true)
    fi
    if [ "$linked" != 0 ]; then
        echo "check_wheel.sh: $(basename "$so") is linked with libpq" >&2
        exit 1
    fi
done

n=0
for requirement in "$@"; do
    n=$((n + 1))
    venv="$WORK/venv$n"
    echo "== $requirement: fresh virtualenv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q "$requirement" cffi
    "$venv/bin/pip" install -q --no-deps "$WHEEL"
    "$venv/bin/pip" list 2>/dev/null | grep -iE '^(psycopg|cffi|pglisten)' | sed 's/^/   /'
    echo "== $requirement: C read path smoke test"
    # Run from the work directory: nothing from the source tree on sys.path.
    (cd "$WORK" && "$venv/bin/python" "$ROOT/scripts/c_path_smoke.py")
done

echo "== check_wheel.sh: passed ($*)"
