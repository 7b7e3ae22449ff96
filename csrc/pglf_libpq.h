/*
 * pglf_libpq.h - the few libpq declarations the read loop needs, and the
 * run-time binding to the libpq psycopg loaded.
 *
 * pglisten_fast is not linked with libpq and needs no libpq header to
 * build: the read loop calls libpq through a table of function pointers,
 * pglf_libpq, filled at run time by pglf_libpq_bind() from one shared
 * object that is already loaded in the process (psycopg's pq extension and
 * the libpq it was linked with, the library psycopg's ctypes layer opened,
 * or the global symbol scope).  The Python side (_readpath.py) decides
 * which binding, if any, matches psycopg's libpq.
 *
 * The types below are declared here rather than taken from libpq-fe.h.
 * PGconn stays opaque.  pglf_notify is libpq's PGnotify, all four fields:
 * the public ones have not changed since PostgreSQL 7.4, and the private
 * `next` is declared as well because the read loop relies on the size of
 * the struct (libpq allocates the strings right after it; see relname_len()
 * in pglf_readloop.c).  It has its own name so that a file may include both
 * this header and libpq-fe.h (csrc/tests/libpq_abi_check.c does, to check
 * these declarations against libpq's).
 *
 * Thread role: pglf_libpq_bind() runs once, at import, with the GIL held;
 * the table is immutable afterwards and only read (by the selector thread).
 */
#ifndef PGLF_LIBPQ_H
#define PGLF_LIBPQ_H

#include <stdint.h>

/* libpq's connection type (libpq-fe.h declares the same typedef). */
typedef struct pg_conn PGconn;

/* libpq's PGnotify (struct pgNotify). */
typedef struct pglf_notify {
    char *relname;              /* channel name */
    int be_pid;                 /* sender's backend PID */
    char *extra;                /* payload */
    struct pglf_notify *next;   /* libpq-private list link */
} pglf_notify;

typedef int (*pglf_PQconsumeInput_fn)(PGconn *conn);
typedef pglf_notify *(*pglf_PQnotifies_fn)(PGconn *conn);
typedef void (*pglf_PQfreemem_fn)(void *ptr);
typedef int (*pglf_PQsocket_fn)(const PGconn *conn);
typedef int (*pglf_PQisBusy_fn)(PGconn *conn);
typedef int (*pglf_PQflush_fn)(PGconn *conn);
typedef int (*pglf_PQlibVersion_fn)(void);
typedef int (*pglf_PQbackendPID_fn)(const PGconn *conn);

/*
 * The libpq functions of one shared object, and what is known of it.
 * Filled by pglf_libpq_bind(); read-only afterwards.
 */
typedef struct pglf_libpq {
    pglf_PQconsumeInput_fn PQconsumeInput;
    pglf_PQnotifies_fn PQnotifies;
    pglf_PQfreemem_fn PQfreemem;
    pglf_PQsocket_fn PQsocket;
    pglf_PQisBusy_fn PQisBusy;
    pglf_PQflush_fn PQflush;
    pglf_PQlibVersion_fn PQlibVersion;
    pglf_PQbackendPID_fn PQbackendPID;
    /* PQlibVersion() of the library (0 until bound). */
    int version;
    /* The shared object every function was found in (dladdr's dli_fname,
     * owned by the dynamic loader), and its load address (dli_fbase): two
     * bindings use the same library exactly when their bases are equal. */
    const char *path;
    uintptr_t base;
    /* dlopen handle of the object searched (0 for the global scope).  Held
     * for the life of the process: the library is never unloaded while its
     * functions may be called. */
    uintptr_t handle;
    /* On failure, the symbol at fault (a static string), and for
     * PGLF_BIND_MIXED the other object it was found in; else NULL. */
    const char *symbol;
    const char *other_path;
} pglf_libpq;

/* pglf_libpq_bind() results */
#define PGLF_BIND_OK 0
#define PGLF_BIND_NOT_LOADED 1  /* `path` names no object already loaded */
#define PGLF_BIND_MISSING 2     /* `symbol` is not found from there */
#define PGLF_BIND_MIXED 3       /* `symbol` comes from another object than the others */
#define PGLF_BIND_UNKNOWN 4     /* dladdr cannot tell where `symbol` comes from */
#define PGLF_BIND_UNSUPPORTED 5 /* no dlopen/dladdr on this platform */

/*
 * Bind `out` to the libpq functions found from `path`, or from the global
 * symbol scope when `path` is NULL.
 *
 * `path` must name a shared object that is already loaded (it is opened
 * with RTLD_NOLOAD, never loaded): psycopg's pq extension module (dlsym on
 * its handle searches the object, then the libraries it was linked with,
 * so this finds the libpq it uses, bundled or system) or the libpq that
 * psycopg's ctypes layer opened.  Every function must come from one and the
 * same object, checked with dladdr.  On success PQlibVersion() is called
 * and `version`, `path`, `base` are set.  Returns PGLF_BIND_*; `out` is
 * usable only on PGLF_BIND_OK.
 */
int pglf_libpq_bind(pglf_libpq *out, const char *path);

/*
 * PQsocket(conn) and PQbackendPID(conn) through a bound table: compared by
 * the caller with what psycopg reports for the same connection before the
 * read loop is used on it.
 */
void pglf_libpq_conn_ids(const pglf_libpq *pq, PGconn *conn, int *sock, int *pid);

#endif /* PGLF_LIBPQ_H */
