#!/usr/bin/env bash
# sanitize.sh - check that the C code compiles without a warning, then build
# and run the C tests under sanitizers:
#
#   1. every csrc/*.c with the package's compiler flags
#      (csrc/build_settings.py: -Wall -Wextra ...) plus -Werror, without
#      libpq's headers (no file may include libpq-fe.h: libpq is bound at run
#      time, csrc/pglf_libpq.h); only pglf_records.c gets Python's headers.
#      When libpq-fe.h is at hand, csrc/tests/libpq_abi_check.c is compiled
#      too: our libpq declarations checked against libpq's own
#   2. csrc/tests/ring_stress.c (two-thread ring stress) with ThreadSanitizer
#   3. csrc/tests/ring_stress.c with AddressSanitizer + UndefinedBehaviorSanitizer
#   4. csrc/tests/router_smoke.c (router, channel map and rings; no libpq) with
#      AddressSanitizer + UndefinedBehaviorSanitizer
#   5. csrc/tests/libpq_bind_smoke.c (the run-time libpq binding and the read
#      loop over a failed connection; libpq.so.5 loaded at run time, its
#      steps skipped when there is none) with AddressSanitizer +
#      UndefinedBehaviorSanitizer
#   6. csrc/tests/ring_detach.c (a producer detaching while its consumer
#      drains: no signal to the producer's fd afterwards) with
#      ThreadSanitizer
#   7. the same with AddressSanitizer + UndefinedBehaviorSanitizer
#
# Usage (from anywhere): scripts/sanitize.sh [RECORDS]
#   RECORDS  records pushed through the ring in steps 2 and 3 (default 2000000)
# Environment: CC (default gcc), PYTHON (default python3: reads
# csrc/build_settings.py and tells where Python.h is),
# PGLISTEN_FAST_EXTRA_CFLAGS (added to the flags of step 1, as in the
# package build), PG_CONFIG (default pg_config; only to find libpq-fe.h for
# the optional ABI check of step 1), LIBPQ (default libpq.so.5: the libpq
# step 5 loads).
#
# Needs gcc with its sanitizer runtimes (Debian/Ubuntu:
# apt-get install libtsan2 libasan8 libubsan1) and Python headers
# (python3-dev); no libpq headers.  Exits non-zero on the first failure.
set -euo pipefail

cd "$(dirname "$0")/.."

RECORDS=${1:-2000000}
CC=${CC:-gcc}
PG_CONFIG=${PG_CONFIG:-pg_config}
LIBPQ=${LIBPQ:-libpq.so.5}
PYTHON=${PYTHON:-python3}
STEPS=7

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
    echo "[$n/$STEPS] PASS  $title (${secs} s): $(grep -E '^(ok|[a-z_]+: ok)' "$log" | tail -n 1)"
}

# --- step 1: no warnings --------------------------------------------------

# libpq-fe.h only for the optional ABI check: the package never needs it.
PG_INC=""
if command -v "$PG_CONFIG" >/dev/null 2>&1; then
    PG_INC=$("$PG_CONFIG" --includedir)
fi
if [ -z "$PG_INC" ] || [ ! -f "$PG_INC/libpq-fe.h" ]; then
    PG_INC=""
    for guess in /usr/include/postgresql /usr/local/include/postgresql /usr/include; do
        if [ -f "$guess/libpq-fe.h" ]; then
            PG_INC=$guess
            break
        fi
    done
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
    local f n=0 extra abi
    local -a inc
    # libpq is bound at run time: no C file may include its header...
    if grep -lE '#[[:space:]]*include[[:space:]]*[<"]libpq-fe\.h[>"]' csrc/*.c csrc/*.h; then
        echo "no file of csrc/ may include libpq-fe.h (files above): libpq is bound at run time"
        return 1
    fi
    # ...and only the binding and the read loop see its declarations.
    if grep -lE '#[[:space:]]*include[[:space:]]*"pglf_libpq\.h"' csrc/*.c csrc/*.h |
        grep -vxE 'csrc/pglf_(libpq|readloop)\.[ch]'; then
        echo "only the libpq binding and the read loop may include pglf_libpq.h (files above)"
        return 1
    fi
    for f in csrc/*.c; do
        case $f in
        csrc/pglf_records.c) inc=(-I "$PY_INC") ;;
        *) inc=() ;;
        esac
        echo "$CC ${PKG_CFLAGS[*]} -Werror -I csrc ${inc[*]} -c $f"
        "$CC" "${PKG_CFLAGS[@]}" -Werror -I csrc "${inc[@]}" -c "$f" \
            -o "$BUILD/$(basename "$f" .c).o" || return 1
        n=$((n + 1))
    done
    if [ -n "$PG_INC" ]; then
        f=csrc/tests/libpq_abi_check.c
        echo "$CC ${PKG_CFLAGS[*]} -Werror -I csrc -I $PG_INC -c $f"
        "$CC" "${PKG_CFLAGS[@]}" -Werror -I csrc -I "$PG_INC" -c "$f" \
            -o "$BUILD/libpq_abi_check.o" || return 1
        abi=", libpq declarations match $PG_INC/libpq-fe.h"
    else
        abi=", libpq ABI check skipped (no libpq-fe.h)"
    fi
    extra=${PGLISTEN_FAST_EXTRA_CFLAGS:+ (extra flags: $PGLISTEN_FAST_EXTRA_CFLAGS)}
    echo "ok $n files, no warning with ${PKG_CFLAGS[*]} -Werror$extra$abi"
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

mapfile -t DL_LIBS < <("$PYTHON" csrc/build_settings.py libraries _pglf)
"$CC" "${COMMON[@]}" "${ASAN[@]}" \
    csrc/tests/libpq_bind_smoke.c csrc/pglf_libpq.c csrc/pglf_readloop.c \
    csrc/pglf_router.c csrc/pglf_chanmap.c csrc/pglf_ring.c "${DL_LIBS[@]}" \
    -o "$BUILD/libpq_bind_smoke_asan"
step 5 "libpq_bind_smoke ($LIBPQ), ASan+UBSan" "$BUILD/bind.log" \
    "$BUILD/libpq_bind_smoke_asan" "$LIBPQ"
sed -n 's/^libpq_bind_smoke: \(.*\)/      \1/p' "$BUILD/bind.log" | grep -v "^      ok$" || true

# --- steps 6, 7: producer detach against a racing consumer ----------------
"$CC" "${COMMON[@]}" "${TSAN[@]}" -Wno-tsan csrc/tests/ring_detach.c csrc/pglf_ring.c \
    -o "$BUILD/ring_detach_tsan"
step 6 "ring_detach, ThreadSanitizer" "$BUILD/detach_tsan.log" \
    "$BUILD/ring_detach_tsan" 2000
"$CC" "${COMMON[@]}" "${ASAN[@]}" csrc/tests/ring_detach.c csrc/pglf_ring.c \
    -o "$BUILD/ring_detach_asan"
step 7 "ring_detach, ASan+UBSan" "$BUILD/detach_asan.log" \
    "$BUILD/ring_detach_asan" 2000

echo "== sanitize.sh: all $STEPS steps passed"
