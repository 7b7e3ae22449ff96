/*
 * libpq_abi_check.c - the libpq declarations of csrc/pglf_libpq.h checked
 * against libpq's own header.  Compiled only (never linked or run) by
 * scripts/sanitize.sh when libpq-fe.h is at hand, with -Werror: the build
 * of pglisten_fast itself never needs libpq's headers.
 *
 * The struct layout is compared field by field, and each libpq function is
 * assigned to the pointer type the read loop calls it through, which does
 * not compile (incompatible pointer types) if a prototype differs.
 */
#include <stddef.h>

#include <libpq-fe.h>

#include "pglf_libpq.h"

#define SAME_FIELD(f)                                                        \
    _Static_assert(offsetof(PGnotify, f) == offsetof(pglf_notify, f) &&      \
                       sizeof(((PGnotify *)0)->f) == sizeof(((pglf_notify *)0)->f), \
                   "PGnotify." #f " differs from pglf_notify." #f)

_Static_assert(sizeof(PGnotify) == sizeof(pglf_notify),
               "PGnotify and pglf_notify differ in size");
SAME_FIELD(relname);
SAME_FIELD(be_pid);
SAME_FIELD(extra);
SAME_FIELD(next);

/* PQnotifies returns libpq's PGnotify *, which has another name here. */
typedef PGnotify *(*libpq_PQnotifies_fn)(PGconn *conn);

int pglf_libpq_abi_check(void);

int pglf_libpq_abi_check(void)
{
    pglf_PQconsumeInput_fn consume_input = PQconsumeInput;
    libpq_PQnotifies_fn notifies = PQnotifies;
    pglf_PQfreemem_fn freemem = PQfreemem;
    pglf_PQsocket_fn get_socket = PQsocket;
    pglf_PQisBusy_fn is_busy = PQisBusy;
    pglf_PQflush_fn flush = PQflush;
    pglf_PQlibVersion_fn lib_version = PQlibVersion;
    pglf_PQbackendPID_fn backend_pid = PQbackendPID;
    return consume_input != NULL && notifies != NULL && freemem != NULL &&
           get_socket != NULL && is_busy != NULL && flush != NULL &&
           lib_version != NULL && backend_pid != NULL;
}
