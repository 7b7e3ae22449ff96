#!/usr/bin/env bash
# sanitize.sh - check that the C code compiles without a warning, then build
# and run the C tests under sanitizers:
#
#   1. every csrc/*.c with the package's compiler flags
#      (csrc/build_settings.py: -Wall -Wextra ...) plus -Werror; only
#      pglf_readloop.c gets libpq's headers and only pglf_records.c Python's,
#      and no other file may include libpq-fe.h
#   2. csrc/tests/ring_stress.c (two-thread ring stress) with ThreadSanitizer
#   3. csrc/tests/ring_stress.c with AddressSanitizer + UndefinedBehaviorSanitizer
#   4. csrc/tests/router_smoke.c (router, channel map and rings; no libpq) with
#      AddressSanitizer + UndefinedBehaviorSanitizer
#
# Usage (from anywhere): scripts/sanitize.sh [RECORDS]
#   RECORDS  records pushed through the ring in steps 2 and 3 (default 2000000)
# Environment: CC (default gcc), PG_CONFIG (default pg_config), PYTHON
# (default python3: reads csrc/build_settings.py and tells where Python.h
# is), PGLISTEN_FAST_EXTRA_CFLAGS (added to the flags of step 1, as in the
# package build).
#
# Needs gcc with its sanitizer runtimes (Debian/Ubuntu:
# apt-get install libtsan2 libasan8 libubsan1), libpq headers
# (apt-get install libpq-dev) and Python headers (python3-dev).  Exits
# non-zero on the first failure.
set -euo pipefail

cd "$(dirname "$0")/.."

RECORDS=${1:-2000000}
CC=${CC:-gcc}
PG_CONFIG=${PG_CONFIG:-pg_config}
PYTHON=${PYTHON:-python3}
STEPS=4

if ! [[ $RECORDS =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [RECORDS]" >&2
    exit 2
fi
if ! command -v "$CC" >/dev/null 2>&1; then
    echo "sanitize.sh: compiler '$CC' not found (apt-get install gcc)" >&2
    exit 1
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "sanitize.sh: '$PYTHON' not found (set PYTHON)" >&2
    exit 1
fi

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/pglf-sanitize.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT

export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export ASAN_OPTIONS="detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

# pglf_ring.c uses POSIX functions that strict -std=c11 hides; the package
# build (csrc/build_settings.py) defines _GNU_SOURCE as well.
COMMON=(-std=c11 -D_GNU_SOURCE -Wall -Wextra -g -O1 -pthread -I csrc)
TSAN=(-fsanitize=thread)
ASAN=(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)

INSTALL_HINT="install the sanitizer runtimes that come with gcc: apt-get install libtsan2 libasan8 libubsan1"

# check_runtime NAME FLAGS...: can we build and run a trivial program?
check_runtime() {
    local name=$1
    shift
    printf 'int main(void) { return 0; }\n' >"$BUILD/probe.c"
    if ! "$CC" "$@" "$BUILD/probe.c" -o "$BUILD/probe-$name" >"$BUILD/probe.log" 2>&1; then
        echo "sanitize.sh: $CC cannot build with $name:" >&2
        sed -n 1,5p "$BUILD/probe.log" >&2
        echo "sanitize.sh: $INSTALL_HINT" >&2
        exit 1
    fi
}

# run_checked LOG CMD...: run, keep the output, retry once without address
# space randomisation when TSan cannot map its shadow memory (old libtsan on
# kernels with high mmap entropy).
run_checked() {
    local log=$1
    shift
    local rc=0
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ] && grep -q "unexpected memory mapping" "$log" &&
        command -v setarch >/dev/null 2>&1; then
        echo "   (retrying with address space randomisation disabled)"
        rc=0
        setarch "$(uname -m)" -R "$@" >"$log" 2>&1 || rc=$?
    fi
    return "$rc"
}

# step N TITLE LOG CMD...: run one test, print a one-line summary.
step() {
    local n=$1 title=$2 log=$3
    shift 3
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    run_checked "$log" "$@" || rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" -ne 0 ]; then
        echo "[$n/$STEPS] FAIL  $title (exit $rc, ${secs} s):"
        cat "$log"
        exit 1
    fi
    if grep -Eq "WARNING: ThreadSanitizer|ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$log"; then
        echo "[$n/$STEPS] FAIL  $title: sanitizer report despite exit 0:"
        cat "$log"
        exit 1
    fi
    echo "[$n/$STEPS] PASS  $title (${secs} s): $(grep -E '^(ok|router_smoke: ok)' "$log" | tail -n 1)"
}

# --- step 1: no warnings --------------------------------------------------

PG_INC=""
if command -v "$PG_CONFIG" >/dev/null 2>&1; then
    PG_INC=$("$PG_CONFIG" --includedir)
elif [ -f /usr/include/postgresql/libpq-fe.h ]; then
    PG_INC=/usr/include/postgresql
fi
if [ -z "$PG_INC" ] || [ ! -f "$PG_INC/libpq-fe.h" ]; then
    echo "sanitize.sh: libpq-fe.h not found (apt-get install libpq-dev)" >&2
    exit 1
fi
PY_INC=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if [ ! -f "$PY_INC/Python.h" ]; then
    echo "sanitize.sh: Python.h not found in $PY_INC (apt-get install python3-dev)" >&2
    exit 1
fi
# The package's flags and macros, one per line (extra flags included).
mapfile -t PKG_CFLAGS < <("$PYTHON" csrc/build_settings.py cflags)
if [ "${#PKG_CFLAGS[@]}" -eq 0 ]; then
    echo "sanitize.sh: csrc/build_settings.py printed no flags" >&2
    exit 1
fi

# warning_build: compile every csrc/*.c with -Werror; print "ok ..." at the end.
warning_build() {
    local f n=0 extra
    local -a inc
    # The read loop is the only C code that may use libpq.
    if grep -lE '#[[:space:]]*include[[:space:]]*[<"]libpq-fe\.h[>"]' csrc/*.c csrc/*.h |
        grep -vx csrc/pglf_readloop.c; then
        echo "only csrc/pglf_readloop.c may include libpq-fe.h (files above)"
        return 1
    fi
    for f in csrc/*.c; do
        case $f in
        csrc/pglf_readloop.c) inc=(-I "$PG_INC") ;;
        csrc/pglf_records.c) inc=(-I "$PY_INC") ;;
        *) inc=() ;;
        esac
        echo "$CC ${PKG_CFLAGS[*]} -Werror -I csrc ${inc[*]} -c $f"
        "$CC" "${PKG_CFLAGS[@]}" -Werror -I csrc "${inc[@]}" -c "$f" \
            -o "$BUILD/$(basename "$f" .c).o" || return 1
        n=$((n + 1))
    done
    extra=${PGLISTEN_FAST_EXTRA_CFLAGS:+ (extra flags: $PGLISTEN_FAST_EXTRA_CFLAGS)}
    echo "ok $n files, no warning with ${PKG_CFLAGS[*]} -Werror$extra"
}

echo "== warning-free build ($("$CC" --version | sed -n 1p))"
step 1 "csrc/*.c with -Werror" "$BUILD/werror.log" warning_build

# --- steps 2-4: sanitizers -------------------------------------------------

echo "== sanitizer builds"
check_runtime tsan "${TSAN[@]}"
check_runtime asan "${ASAN[@]}"

# -Wno-tsan: gcc notes that TSan does not model atomic_thread_fence (the
# Dekker-style wake-up handshakes); their correctness is checked by the
# stress test's wake-up timeouts instead.
"$CC" "${COMMON[@]}" "${TSAN[@]}" -Wno-tsan csrc/tests/ring_stress.c csrc/pglf_ring.c \
    -o "$BUILD/ring_stress_tsan"
step 2 "ring_stress, ThreadSanitizer, $RECORDS records" "$BUILD/tsan.log" \
    "$BUILD/ring_stress_tsan" "$RECORDS"

"$CC" "${COMMON[@]}" "${ASAN[@]}" csrc/tests/ring_stress.c csrc/pglf_ring.c \
    -o "$BUILD/ring_stress_asan"
step 3 "ring_stress, ASan+UBSan, $RECORDS records" "$BUILD/asan.log" \
    "$BUILD/ring_stress_asan" "$RECORDS"

"$CC" "${COMMON[@]}" "${ASAN[@]}" \
    csrc/tests/router_smoke.c csrc/pglf_router.c csrc/pglf_chanmap.c csrc/pglf_ring.c \
    -o "$BUILD/router_smoke_asan"
step 4 "router_smoke, ASan+UBSan" "$BUILD/router.log" "$BUILD/router_smoke_asan"
sed -n 's/^router_smoke: \([a-z-]* *ok\)/      \1/p' "$BUILD/router.log" | grep -v "^      ok$" || true

echo "== sanitize.sh: all $STEPS steps passed"
