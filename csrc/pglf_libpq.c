/*
 * pglf_libpq.c - bind the read loop to a libpq that is already loaded:
 * dlopen(RTLD_NOLOAD) + dlsym, one object for every function (dladdr).
 * See pglf_libpq.h.
 *
 * Nothing here reads /proc: the loader itself (dlopen, dlsym, dladdr)
 * tells where each function lives.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1   /* dladdr, RTLD_DEFAULT, RTLD_NOLOAD */
#endif
#include "pglf_libpq.h"

#include <stddef.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define PGLF_HAVE_DL 1
#endif

/* The symbols and where each goes in the table, in lookup order. */
static const struct {
    const char *name;
    size_t offset;
} SYMBOLS[] = {
    {"PQconsumeInput", offsetof(pglf_libpq, PQconsumeInput)},
    {"PQnotifies", offsetof(pglf_libpq, PQnotifies)},
    {"PQfreemem", offsetof(pglf_libpq, PQfreemem)},
    {"PQsocket", offsetof(pglf_libpq, PQsocket)},
    {"PQisBusy", offsetof(pglf_libpq, PQisBusy)},
    {"PQflush", offsetof(pglf_libpq, PQflush)},
    {"PQlibVersion", offsetof(pglf_libpq, PQlibVersion)},
    {"PQbackendPID", offsetof(pglf_libpq, PQbackendPID)},
};

/* Every function pointer of the table has the size of a data pointer
 * (POSIX requires dlsym's void * to convert to a function pointer). */
_Static_assert(sizeof(pglf_PQconsumeInput_fn) == sizeof(void *),
               "function pointers must have the size of data pointers");

int pglf_libpq_bind(pglf_libpq *out, const char *path)
{
    memset(out, 0, sizeof *out);
#ifdef PGLF_HAVE_DL
    void *handle = RTLD_DEFAULT;
    if (path != NULL) {
        handle = dlopen(path, RTLD_NOLOAD | RTLD_LAZY);
        if (handle == NULL)
            return PGLF_BIND_NOT_LOADED;
    }
    const void *base = NULL;
    int rc = PGLF_BIND_OK;
    for (size_t i = 0; i < sizeof SYMBOLS / sizeof SYMBOLS[0]; i++) {
        void *addr = dlsym(handle, SYMBOLS[i].name);
        Dl_info info;
        if (addr == NULL) {
            rc = PGLF_BIND_MISSING;
        } else if (!dladdr(addr, &info) || info.dli_fbase == NULL) {
            rc = PGLF_BIND_UNKNOWN;
        } else if (i == 0) {
            base = info.dli_fbase;
            out->path = info.dli_fname;
        } else if (info.dli_fbase != base) {
            rc = PGLF_BIND_MIXED;
            out->other_path = info.dli_fname;
        }
        if (rc != PGLF_BIND_OK) {
            out->symbol = SYMBOLS[i].name;
            break;
        }
        /* void * to function pointer, the way POSIX's dlsym examples do. */
        memcpy((char *)out + SYMBOLS[i].offset, &addr, sizeof addr);
    }
    if (rc != PGLF_BIND_OK) {
        const char *symbol = out->symbol, *first = out->path, *other = out->other_path;
        memset(out, 0, sizeof *out);
        out->symbol = symbol;
        out->path = first;
        out->other_path = other;
        if (path != NULL)
            dlclose(handle);
        return rc;
    }
    out->base = (uintptr_t)base;
    /* Kept open (never dlclose'd): the functions stay valid. */
    out->handle = path != NULL ? (uintptr_t)handle : 0;
    out->version = out->PQlibVersion();
    return PGLF_BIND_OK;
#else
    (void)path;
    return PGLF_BIND_UNSUPPORTED;
#endif
}

void pglf_libpq_conn_ids(const pglf_libpq *pq, PGconn *conn, int *sock, int *pid)
{
    *sock = pq->PQsocket(conn);
    *pid = pq->PQbackendPID(conn);
}
