/*
 * c_listener.c - the ceiling: a minimal libpq LISTEN loop in C.
 *
 * Speaks the benchmark client protocol of benchmarks/peers.py:
 *
 *     c_listener DSN CHANNEL N [MODE]
 *
 * connects, LISTENs on CHANNEL, prints "ready" (flushed) once LISTEN is in
 * effect, then loops select() on PQsocket -> PQconsumeInput -> PQnotifies
 * (counting and PQfreemem'ing every notification) until N notifications
 * have arrived, and prints one JSON line:
 *
 *     {"client": "c", "mode": ..., "count": N, "first": t, "last": t,
 *      "cpu_s": ..., "cpu_user_s": ..., "cpu_sys_s": ..., "ctx_switches": ...,
 *      "maxrss_kb": ..., "last_payload": "...",
 *      ["delay_median_us": ..., "delay_p99_us": ...]}
 *
 * first/last are CLOCK_REALTIME receipt times as float seconds (comparable
 * with Python's time.time() in the driver).  CPU times and context switches
 * cover the window from "ready" to the last receipt; maxrss_kb is the peak
 * RSS (VmHWM).  MODE "burst" (default) only counts; MODE "steady" parses
 * each payload as the sender's CLOCK_REALTIME time and reports the median
 * and 99th percentile of receipt - send.
 *
 * Build: gcc -O2 -o c_listener c_listener.c -I$(pg_config --includedir) \
 *            -L$(pg_config --libdir) -lpq
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <time.h>

#include <libpq-fe.h>

static double now_realtime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Peak RSS in KiB: VmHWM of this program's memory map.  Not ru_maxrss,
 * which Linux carries over from the parent across fork/exec. */
static long peak_rss_kb(long fallback)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = 0;
    if (f == NULL)
        return fallback;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "VmHWM:", 6) == 0) {
            kb = atol(line + 6);
            break;
        }
    fclose(f);
    return kb > 0 ? kb : fallback;
}

static void cpu_times(double *user, double *sys, long *maxrss_kb, long *ctx)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6;
    *sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
    *maxrss_kb = ru.ru_maxrss;
    *ctx = ru.ru_nvcsw + ru.ru_nivcsw;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Print s as a JSON string body (payloads here are ASCII digits/dots). */
static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void die(const char *what, PGconn *conn)
{
    fprintf(stderr, "c_listener: %s: %s\n", what,
            conn ? PQerrorMessage(conn) : strerror(errno));
    if (conn)
        PQfinish(conn);
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: %s DSN CHANNEL N [burst|steady]\n", argv[0]);
        return 2;
    }
    const char *dsn = argv[1], *channel = argv[2];
    long long want = atoll(argv[3]);
    const char *mode = argc == 5 ? argv[4] : "burst";
    int steady = strcmp(mode, "steady") == 0;
    if (want <= 0 || (!steady && strcmp(mode, "burst") != 0)) {
        fprintf(stderr, "c_listener: bad N or mode\n");
        return 2;
    }

    PGconn *conn = PQconnectdb(dsn);
    if (PQstatus(conn) != CONNECTION_OK)
        die("connect", conn);
    char *ident = PQescapeIdentifier(conn, channel, strlen(channel));
    if (ident == NULL)
        die("escape", conn);
    size_t qlen = strlen(ident) + 8;
    char *query = malloc(qlen);
    if (query == NULL)
        die("malloc", NULL);
    snprintf(query, qlen, "LISTEN %s", ident);
    PQfreemem(ident);
    PGresult *res = PQexec(conn, query);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        die("LISTEN", conn);
    PQclear(res);
    free(query);

    double *delays = NULL;
    if (steady) {
        delays = malloc((size_t)want * sizeof(double));
        if (delays == NULL)
            die("malloc", NULL);
    }

    double u0, s0, u1, s1;
    long rss, cs0, cs1;
    cpu_times(&u0, &s0, &rss, &cs0);
    puts("ready");
    fflush(stdout);

    int sock = PQsocket(conn);
    long long count = 0;
    double first = 0.0, last = 0.0;
    char last_payload[65] = "";   /* first 64 bytes, as peers.py */
    while (count < want) {
        fd_set rfds;
        FD_ZERO(&rfds);
        FD_SET(sock, &rfds);
        if (select(sock + 1, &rfds, NULL, NULL, NULL) < 0) {
            if (errno == EINTR)
                continue;
            die("select", NULL);
        }
        if (!PQconsumeInput(conn))
            die("PQconsumeInput", conn);
        PGnotify *n;
        double t = 0.0;
        while ((n = PQnotifies(conn)) != NULL) {
            if (count == 0 || steady)
                t = now_realtime();
            if (count == 0)
                first = t;
            if (steady)
                delays[count] = t - strtod(n->extra, NULL);
            count++;
            if (count == want) {
                last = steady ? t : now_realtime();
                snprintf(last_payload, sizeof(last_payload), "%s", n->extra);
            }
            PQfreemem(n);
        }
    }
    cpu_times(&u1, &s1, &rss, &cs1);
    rss = peak_rss_kb(rss);

    printf("{\"client\": \"c\", \"mode\": \"%s\", \"count\": %lld, "
           "\"first\": %.6f, \"last\": %.6f, \"cpu_s\": %.6f, "
           "\"cpu_user_s\": %.6f, \"cpu_sys_s\": %.6f, \"ctx_switches\": %ld, "
           "\"maxrss_kb\": %ld, \"last_payload\": ",
           mode, count, first, last, (u1 - u0) + (s1 - s0), u1 - u0, s1 - s0,
           cs1 - cs0, rss);
    json_string(last_payload);
    if (steady) {
        qsort(delays, (size_t)count, sizeof(double), cmp_double);
        double med = delays[count / 2];
        size_t i99 = (size_t)((double)(count - 1) * 0.99);
        printf(", \"delay_median_us\": %.1f, \"delay_p99_us\": %.1f",
               med * 1e6, delays[i99] * 1e6);
        free(delays);
    }
    puts("}");
    fflush(stdout);
    PQfinish(conn);
    return 0;
}
