/*
 * c_sender.c - the stream sender of compare.py in C: paced pg_notify calls,
 * one transaction each, through a libpq pipeline.
 *
 *     c_sender DSN CHANNEL
 *
 * connects, prepares "SELECT pg_notify($1, $2)" as pglf_bench_notify and
 * prints "ready <backend pid>".  Then, for every command line read on
 * stdin,
 *
 *     RATE N SECONDS INFLIGHT
 *
 * it sends one stream and prints one JSON line (the same keys as
 * bench_driver.Driver.stream).  EOF on stdin ends the program.
 *
 * Every notification is EXECUTE pglf_bench_notify(CHANNEL, payload) followed
 * by a Sync (PQpipelineSync), so each is its own implicit transaction and the
 * sender never waits for a round trip; answers are read whenever nothing is
 * due.  The payload is CLOCK_REALTIME taken just before the statement is
 * queued, "%032.6f" (32 bytes).
 *
 * RATE > 0: paced.  Statement i is due at t0 + i / RATE (CLOCK_MONOTONIC);
 * the sender sleeps until the next one is due (clock_nanosleep, absolute)
 * and then queues every statement whose time has come (at most 256 at
 * once), each with its own timestamp.  N statements, or SECONDS worth when
 * N is 0.
 *
 * RATE == 0: unpaced for SECONDS, with at most INFLIGHT statements
 * unanswered; then an end marker (a negative timestamp) tells the client to
 * stop.
 *
 * Build: gcc -O2 -o c_sender c_sender.c -I$(pg_config --includedir) \
 *            -L$(pg_config --libdir) -lpq          (libpq 14 or later)
 */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#define STMT "pglf_bench_notify"
#define SEND_BATCH 256

static double clock_s(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what, PGconn *conn)
{
    fprintf(stderr, "c_sender: %s: %s\n", what,
            conn ? PQerrorMessage(conn) : strerror(errno));
    exit(2);
}

/* A growable array of doubles. */
typedef struct {
    double *v;
    size_t n, cap;
} vec;

static void push(vec *a, double x)
{
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 4096;
        a->v = realloc(a->v, a->cap * sizeof(double));
        if (a->v == NULL)
            die("realloc", NULL);
    }
    a->v[a->n++] = x;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Value at rank int((n - 1) * q) of a sorted array (NaN when empty), in us. */
static double pct_us(const vec *a, double q)
{
    if (a->n == 0)
        return NAN;
    return a->v[(size_t)((double)(a->n - 1) * q)] * 1e6;
}

static void print_num(const char *key, double v, int last)
{
    if (isnan(v))
        printf("\"%s\": NaN%s", key, last ? "" : ", ");
    else
        printf("\"%s\": %.6f%s", key, v, last ? "" : ", ");
}

typedef struct {
    PGconn *conn;
    long long sent, synced;
    vec send_ts;   /* CLOCK_REALTIME of every statement, by number */
    vec acks;      /* send -> Sync read here, seconds */
} stream_state;

/* Flush, read, and count the Syncs that arrived. */
static void drain(stream_state *s)
{
    PQflush(s->conn);
    if (!PQconsumeInput(s->conn))
        die("PQconsumeInput", s->conn);
    while (s->synced < s->sent && !PQisBusy(s->conn)) {
        PGresult *res = PQgetResult(s->conn);
        if (res == NULL)
            continue;
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_PIPELINE_SYNC) {
            push(&s->acks, clock_s(CLOCK_REALTIME) - s->send_ts.v[s->synced]);
            s->synced++;
        } else if (st == PGRES_FATAL_ERROR || st == PGRES_PIPELINE_ABORTED) {
            fprintf(stderr, "c_sender: pg_notify failed: %s",
                    PQresultErrorMessage(res));
            exit(3);
        }
        PQclear(res);
    }
}

static void wait_io(stream_state *s, int timeout_ms)
{
    struct pollfd p = {.fd = PQsocket(s->conn), .events = POLLIN};
    if (PQflush(s->conn) == 1)
        p.events |= POLLOUT;
    poll(&p, 1, timeout_ms);
}

static void send_one(stream_state *s, const char *chan, double ts)
{
    char payload[64];
    snprintf(payload, sizeof(payload), "%032.6f", ts);
    const char *params[2] = {chan, payload};
    if (!PQsendQueryPrepared(s->conn, STMT, 2, params, NULL, NULL, 0))
        die("PQsendQueryPrepared", s->conn);
    if (!PQpipelineSync(s->conn))
        die("PQpipelineSync", s->conn);
}

static void stream(PGconn *conn, const char *chan, double rate, long long n,
                   double seconds, long long inflight)
{
    stream_state s = {.conn = conn};
    vec lags = {0};
    int paced = rate > 0;
    if (paced && n <= 0)
        n = (long long)(rate * seconds);
    if (n <= 0)
        n = paced ? 1 : (1LL << 62);
    double interval = paced ? 1.0 / rate : 0.0;
    long long batches = 0, count;
    double t_first = 0.0, t_last = 0.0;

    if (PQsetnonblocking(conn, 1) != 0)
        die("PQsetnonblocking", conn);
    if (!PQenterPipelineMode(conn))
        die("PQenterPipelineMode", conn);
    double cpu0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
    double t0 = clock_s(CLOCK_MONOTONIC) + 0.005;
    double deadline = t0 + seconds;

    while (s.sent < n) {
        double now = clock_s(CLOCK_MONOTONIC);
        long long k;
        if (paced) {
            long long due = (long long)floor((now - t0) * rate) + 1;
            if (due > n)
                due = n;
            k = due - s.sent;
            if (k <= 0) {
                drain(&s);
                double next = t0 + (double)s.sent * interval;
                struct timespec ts;
                ts.tv_sec = (time_t)next;
                ts.tv_nsec = (long)((next - (double)ts.tv_sec) * 1e9);
                if (next > clock_s(CLOCK_MONOTONIC))
                    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                continue;
            }
            push(&lags, now - (t0 + (double)s.sent * interval));
        } else {
            if (now >= deadline)
                break;
            k = inflight - (s.sent - s.synced);
            if (k <= 0) {
                drain(&s);
                if (inflight - (s.sent - s.synced) <= 0)
                    wait_io(&s, 500);
                continue;
            }
        }
        if (k > SEND_BATCH)
            k = SEND_BATCH;
        for (long long i = 0; i < k; i++) {
            double ts = clock_s(CLOCK_REALTIME);
            send_one(&s, chan, ts);
            push(&s.send_ts, ts);
            if (s.sent + i == 0)
                t_first = ts;
            t_last = ts;
        }
        s.sent += k;
        batches++;
        drain(&s);
    }
    count = s.sent;
    if (!paced) {
        double ts = clock_s(CLOCK_REALTIME);
        send_one(&s, chan, -1.0);
        push(&s.send_ts, ts);
        s.sent++;
    }
    while (s.synced < s.sent) {
        drain(&s);
        if (s.synced < s.sent)
            wait_io(&s, 1000);
    }
    double cpu = clock_s(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    while (PQflush(conn) == 1)
        wait_io(&s, 10);
    if (!PQexitPipelineMode(conn))
        die("PQexitPipelineMode", conn);
    PQsetnonblocking(conn, 0);

    qsort(s.acks.v, s.acks.n, sizeof(double), cmp_double);
    qsort(lags.v, lags.n, sizeof(double), cmp_double);
    printf("{\"sender\": \"c\", \"target_rate\": %.1f, \"sent\": %lld, "
           "\"batches\": %lld, ", paced ? rate : 0.0, count, batches);
    print_num("t_first", t_first, 0);
    print_num("t_last", t_last, 0);
    print_num("send_rate", count > 1 && t_last > t_first
              ? (double)(count - 1) / (t_last - t_first) : 0.0, 0);
    print_num("sender_cpu_s", cpu, 0);
    print_num("ack_median_us", pct_us(&s.acks, 0.5), 0);
    print_num("ack_p99_us", pct_us(&s.acks, 0.99), 0);
    print_num("lag_median_us", pct_us(&lags, 0.5), 0);
    print_num("lag_p99_us", pct_us(&lags, 0.99), 0);
    print_num("lag_max_us", pct_us(&lags, 1.0), 1);
    puts("}");
    fflush(stdout);
    free(s.send_ts.v);
    free(s.acks.v);
    free(lags.v);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s DSN CHANNEL\n", argv[0]);
        return 2;
    }
    PGconn *conn = PQconnectdb(argv[1]);
    if (PQstatus(conn) != CONNECTION_OK)
        die("connect", conn);
    PGresult *res = PQprepare(conn, STMT, "SELECT pg_notify($1, $2)", 2, NULL);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        die("prepare", conn);
    PQclear(res);
    printf("ready %d\n", PQbackendPID(conn));
    fflush(stdout);

    char line[256];
    while (fgets(line, sizeof(line), stdin)) {
        double rate, seconds;
        long long n, inflight;
        if (sscanf(line, "%lf %lld %lf %lld", &rate, &n, &seconds, &inflight) != 4) {
            fprintf(stderr, "c_sender: bad command %s", line);
            return 2;
        }
        stream(conn, argv[2], rate, n, seconds, inflight);
    }
    PQfinish(conn);
    return 0;
}
