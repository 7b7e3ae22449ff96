/*
 * ring_detach.c - pglf_ring_detach_producer() under a racing consumer.
 *
 * The producer of a ring waits for space (producer_wait_arm), so the
 * consumer signals producer_wfd when it frees some.  Detaching must make
 * that fd safe to close: once pglf_ring_detach_producer() returns, no
 * consumer may write to it.  Each round races a draining consumer thread
 * against a detach; then the fd number is taken over by a pipe (dup2), the
 * consumer drains on, and the pipe must stay empty.
 *
 * Build and run (scripts/sanitize.sh does, under ThreadSanitizer):
 *   cc -std=c11 -D_GNU_SOURCE -pthread -I csrc csrc/tests/ring_detach.c \
 *      csrc/pglf_ring.c -o ring_detach && ./ring_detach [ROUNDS]
 */
#include "pglf_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define CAP 4096

static void die(const char *what)
{
    perror(what);
    exit(1);
}

struct round {
    pglf_ring *ring;
    _Atomic int stop;
};

static void *consumer(void *arg)
{
    struct round *rd = arg;
    static _Thread_local char out[CAP];
    size_t used;
    while (!atomic_load(&rd->stop))
        pglf_ring_drain(rd->ring, out, sizeof(out), 4, &used);
    /* Drain what is left: every record frees space, and a consumer that
     * forgot the detach would signal now. */
    while (pglf_ring_drain(rd->ring, out, sizeof(out), 4, &used) > 0)
        ;
    return NULL;
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? strtol(argv[1], NULL, 10) : 2000;
    char payload[200] = {0};
    for (long i = 0; i < rounds; i++) {
        int pfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        int cfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (pfd < 0 || cfd < 0)
            die("eventfd");
        struct round rd = {.ring = pglf_ring_new(CAP, cfd, cfd, pfd)};
        if (rd.ring == NULL)
            die("pglf_ring_new");
        pthread_t t;
        if (pthread_create(&t, NULL, consumer, &rd) != 0)
            die("pthread_create");
        /* Fill, then wait for space, a few times, then detach at once. */
        for (int k = 0; k < 1 + (int)(i % 7); k++) {
            while (pglf_ring_write(rd.ring, PGLF_KIND_NOTIFY, 0, 0, 0, payload,
                                   sizeof(payload), 0) == PGLF_OK)
                ;
            pglf_ring_producer_wait_arm(rd.ring, CAP / 2);
        }
        pglf_ring_detach_producer(rd.ring);
        /* The fd number now belongs to a pipe: any later signal lands in it. */
        int pipefd[2];
        if (pipe(pipefd) != 0)
            die("pipe");
        if (dup2(pipefd[1], pfd) < 0)
            die("dup2");
        atomic_store(&rd.stop, 1);
        pthread_join(t, NULL);
        char buf[8];
        if (fcntl(pipefd[0], F_SETFL, O_NONBLOCK) != 0)
            die("fcntl");
        ssize_t n = read(pipefd[0], buf, sizeof(buf));
        if (n != -1 || errno != EAGAIN) {
            fprintf(stderr, "round %ld: the consumer signalled a detached "
                            "producer's fd\n", i);
            return 1;
        }
        pglf_ring_free(rd.ring);
        close(pipefd[0]);
        close(pipefd[1]);
        close(pfd);
        close(cfd);
    }
    printf("ring_detach: ok, %ld rounds, no signal after detach\n", rounds);
    return 0;
}
