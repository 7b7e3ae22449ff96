/*
 * libpq_bind_smoke.c - the run-time libpq binding (csrc/pglf_libpq.c) and
 * the read loop on top of it (csrc/pglf_readloop.c), without a server and
 * without linking libpq: meant for ASan/UBSan builds (scripts/sanitize.sh).
 *
 * Steps: nothing bound from the global scope or from an object that is not
 * loaded; a loaded library without libpq (the C library) refused with the
 * missing symbol; the libpq loaded with RTLD_LOCAL bound through its own
 * handle, every function from that one object, PQlibVersion() called; the
 * same libpq bound from the global scope once it is promoted to
 * RTLD_GLOBAL, to the same object; and pglf_pump/pglf_run over a PGconn
 * whose connection failed (libpq reports an error, the router is left
 * alone, nothing leaks).
 *
 * Build and run (libpq only at run time; no libpq headers):
 *   gcc -std=c11 -D_GNU_SOURCE -I csrc csrc/tests/libpq_bind_smoke.c \
 *       csrc/pglf_libpq.c csrc/pglf_readloop.c csrc/pglf_router.c \
 *       csrc/pglf_chanmap.c csrc/pglf_ring.c -o libpq_bind_smoke
 *   ./libpq_bind_smoke [LIBPQ]      (default libpq.so.5)
 * Exits 0 and prints "libpq_bind_smoke: ok" on success; when LIBPQ cannot
 * be loaded the steps that need it are skipped (said on stdout).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pglf_libpq.h"
#include "pglf_readloop.h"

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "libpq_bind_smoke: %s:%d: check failed: %s\n",   \
                    __FILE__, __LINE__, #cond);                              \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

typedef PGconn *(*connectdb_fn)(const char *conninfo);
typedef void (*finish_fn)(PGconn *conn);

/* A PGconn whose connection failed: no server is needed. */
static void failed_connection(const pglf_libpq *pq, void *handle)
{
    connectdb_fn connectdb;
    finish_fn finish;
    void *a = dlsym(handle, "PQconnectdb"), *b = dlsym(handle, "PQfinish");
    CHECK(a != NULL && b != NULL);
    memcpy(&connectdb, &a, sizeof a);
    memcpy(&finish, &b, sizeof b);
    /* A Unix socket directory that does not exist: fails at once. */
    PGconn *conn = connectdb("host=/nonexistent/pglf-smoke port=1 connect_timeout=1");
    CHECK(conn != NULL);

    int sock = 0, pid = 1;
    pglf_libpq_conn_ids(pq, conn, &sock, &pid);
    CHECK(sock == -1 && pid == 0);

    pglf_router *r = pglf_router_new();
    CHECK(r != NULL);
    CHECK(pglf_pump(r, pq, conn) & PGLF_RUN_ERROR);
    CHECK(pglf_run(r, pq, conn, -1, 10) == PGLF_RUN_ERROR);
    CHECK(pglf_router_received(r) == 0);
    pglf_router_free(r);
    finish(conn);
    printf("libpq_bind_smoke: failed connection ok\n");
}

int main(int argc, char **argv)
{
    const char *libpq = argc > 1 ? argv[1] : "libpq.so.5";
    pglf_libpq pq;

    /* Nothing loaded yet: no libpq anywhere. */
    CHECK(pglf_libpq_bind(&pq, NULL) == PGLF_BIND_MISSING);
    CHECK(pq.symbol != NULL && strcmp(pq.symbol, "PQconsumeInput") == 0);
    CHECK(pq.PQconsumeInput == NULL && pq.version == 0);
    CHECK(pglf_libpq_bind(&pq, "/nonexistent/libpq.so.5") == PGLF_BIND_NOT_LOADED);
    printf("libpq_bind_smoke: nothing to bind ok\n");

    /* A loaded library that is not libpq. */
    void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    if (libc != NULL) {
        CHECK(pglf_libpq_bind(&pq, "libc.so.6") == PGLF_BIND_MISSING);
        CHECK(strcmp(pq.symbol, "PQconsumeInput") == 0);
        dlclose(libc);
        printf("libpq_bind_smoke: not a libpq ok\n");
    }

    void *handle = dlopen(libpq, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        printf("libpq_bind_smoke: skipped the libpq steps: %s\n", dlerror());
        printf("libpq_bind_smoke: ok\n");
        return 0;
    }
    /* RTLD_LOCAL: found through its handle, not in the global scope. */
    CHECK(pglf_libpq_bind(&pq, NULL) == PGLF_BIND_MISSING);
    CHECK(pglf_libpq_bind(&pq, libpq) == PGLF_BIND_OK);
    CHECK(pq.PQconsumeInput && pq.PQnotifies && pq.PQfreemem && pq.PQsocket &&
          pq.PQisBusy && pq.PQflush && pq.PQlibVersion && pq.PQbackendPID);
    CHECK(pq.version >= 90100 && pq.version == pq.PQlibVersion());
    CHECK(pq.path != NULL && pq.base != 0 && pq.handle != 0 && pq.symbol == NULL);
    printf("libpq_bind_smoke: bound libpq %d at %s ok\n", pq.version, pq.path);

    failed_connection(&pq, handle);

    /* Promoted to the global scope: the same object from there. */
    void *global = dlopen(libpq, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
    CHECK(global != NULL);
    pglf_libpq other;
    CHECK(pglf_libpq_bind(&other, NULL) == PGLF_BIND_OK);
    CHECK(other.base == pq.base && other.handle == 0);
    CHECK(other.PQnotifies == pq.PQnotifies && other.version == pq.version);
    printf("libpq_bind_smoke: global scope, same object ok\n");

    /* The handles bind_libpq kept open are never closed by design; these
     * are ours. */
    dlclose(global);
    dlclose(handle);
    printf("libpq_bind_smoke: ok\n");
    return 0;
}
