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
 *      "cpu_s": ..., "cpu_source": "schedstat", "cpu_rusage_s": ...,
 *      "cpu_user_s": ..., "cpu_sys_s": ..., "ctx_switches": ...,
 *      "wakeups": ..., "involuntary": ..., "nthreads": ..., "threads_gone": 0,
 *      "maxrss_kb": ..., "last_payload": "...",
 *      ["delay_median_us": ..., "delay_p90_us": ..., "delay_p99_us": ...,
 *       "delay_p999_us": ..., "delay_max_us": ...]}
 *
 * first/last are CLOCK_REALTIME receipt times as float seconds (comparable
 * with Python's time.time() in the driver).  CPU times and context switches
 * cover the window from "ready" to the last receipt, like peers.py: cpu_s
 * sums the first field of /proc/self/task/<tid>/schedstat (on-CPU ns) over
 * every thread, wakeups their voluntary_ctxt_switches (cpu_rusage_s and
 * ctx_switches come from getrusage, the cross-check); maxrss_kb is the peak
 * RSS (VmHWM).  MODE "burst" (default) only counts; MODE "steady" parses
 * each payload as the sender's CLOCK_REALTIME time, reports percentiles of
 * receipt - send, and stops early at a negative time (the sender's end
 * marker, not counted).
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
#include <dirent.h>
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

/* Sum over every thread of this process: on-CPU ns (schedstat), voluntary
 * and involuntary context switches (status); returns the thread count, or
 * -1 without /proc. */
static long task_totals(long long *cpu_ns, long *vol, long *invol)
{
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    char path[300], line[256];
    long n = 0;
    *cpu_ns = 0;
    *vol = *invol = 0;
    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        snprintf(path, sizeof(path), "/proc/self/task/%s/schedstat", e->d_name);
        FILE *f = fopen(path, "r");
        long long ns;
        if (f == NULL)
            continue;
        int ok = fscanf(f, "%lld", &ns) == 1;
        fclose(f);
        if (!ok)
            continue;
        *cpu_ns += ns;
        snprintf(path, sizeof(path), "/proc/self/task/%s/status", e->d_name);
        f = fopen(path, "r");
        if (f != NULL) {
            while (fgets(line, sizeof(line), f)) {
                if (strncmp(line, "voluntary_ctxt_switches:", 24) == 0)
                    *vol += atol(line + 24);
                else if (strncmp(line, "nonvoluntary_ctxt_switches:", 27) == 0)
                    *invol += atol(line + 27);
            }
            fclose(f);
        }
        n++;
    }
    closedir(d);
    return n;
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
    size_t ndelays = 0, cap = 0;
    if (steady) {
        cap = want < 1 << 20 ? (size_t)want : 1 << 20;
        delays = malloc(cap * sizeof(double));
        if (delays == NULL)
            die("malloc", NULL);
    }

    double u0, s0, u1, s1;
    long rss, cs0, cs1, vol0, vol1, inv0, inv1;
    long long ns0, ns1;
    cpu_times(&u0, &s0, &rss, &cs0);
    long nthreads = task_totals(&ns0, &vol0, &inv0);
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
            if (steady) {
                double sent = strtod(n->extra, NULL);
                if (sent < 0) {   /* the sender's end marker */
                    PQfreemem(n);
                    want = count;
                    last = t;
                    break;
                }
                if (ndelays == cap) {
                    cap *= 2;
                    delays = realloc(delays, cap * sizeof(double));
                    if (delays == NULL)
                        die("realloc", NULL);
                }
                delays[ndelays++] = t - sent;
            }
            if (count == 0)
                first = t;
            count++;
            if (count == want) {
                last = steady ? t : now_realtime();
                snprintf(last_payload, sizeof(last_payload), "%s", n->extra);
            }
            PQfreemem(n);
        }
    }
    cpu_times(&u1, &s1, &rss, &cs1);
    long nthreads1 = task_totals(&ns1, &vol1, &inv1);
    rss = peak_rss_kb(rss);
    double rusage_s = (u1 - u0) + (s1 - s0);

    printf("{\"client\": \"c\", \"mode\": \"%s\", \"count\": %lld, "
           "\"first\": %.6f, \"last\": %.6f, \"cpu_s\": %.9f, "
           "\"cpu_source\": \"%s\", \"cpu_rusage_s\": %.6f, "
           "\"cpu_user_s\": %.6f, \"cpu_sys_s\": %.6f, \"ctx_switches\": %ld, ",
           mode, count, first, last,
           nthreads > 0 ? (double)(ns1 - ns0) * 1e-9 : rusage_s,
           nthreads > 0 ? "schedstat" : "rusage", rusage_s,
           u1 - u0, s1 - s0, cs1 - cs0);
    if (nthreads > 0 && nthreads1 > 0)
        printf("\"wakeups\": %ld, \"involuntary\": %ld, \"nthreads\": %ld, "
               "\"threads_gone\": 0, ", vol1 - vol0, inv1 - inv0, nthreads1);
    printf("\"maxrss_kb\": %ld, \"last_payload\": ", rss);
    json_string(last_payload);
    if (steady && ndelays > 0) {
        static const struct { const char *name; double q; } pct[] = {
            {"median", 0.5}, {"p90", 0.9}, {"p99", 0.99}, {"p999", 0.999},
            {"max", 1.0}};
        qsort(delays, ndelays, sizeof(double), cmp_double);
        for (size_t k = 0; k < sizeof(pct) / sizeof(pct[0]); k++) {
            size_t i = (size_t)((double)(ndelays - 1) * pct[k].q);
            printf(", \"delay_%s_us\": %.1f", pct[k].name, delays[i] * 1e6);
        }
    }
    free(delays);
    puts("}");
    fflush(stdout);
    PQfinish(conn);
    return 0;
}
