/*
 * A real moed for the benchmarks that talk to it (bench-grpc, bench-shm):
 * started on a model, gRPC on a loopback port of its choosing and, when
 * asked, shared-memory clients on a socket; stopped with SIGTERM at exit
 * (of the process that started it, not of children it forks).
 */
#ifndef MOED_TESTS_BENCH_MOED_H
#define MOED_TESTS_BENCH_MOED_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t bench_moed_pid, bench_moed_owner;

static inline void bench_moed_stop(void)
{
    if (bench_moed_pid > 0 && getpid() == bench_moed_owner) {
        kill(bench_moed_pid, SIGTERM);
        waitpid(bench_moed_pid, NULL, 0);
        bench_moed_pid = 0;
    }
}

/* Starts bin on model (served as "bench", batch window 1 us); shm_sock:
 * the shared-memory socket, or NULL.  Returns the gRPC port; on failure
 * prints why, prefixed by who, and exits 1. */
static inline int bench_moed_start(const char *who, const char *bin, const char *model,
                                   const char *shm_sock)
{
    int fds[2], port = 0;
    char spec[4200], line[4400];
    const char *why = NULL;
    FILE *f;

    snprintf(spec, sizeof(spec), "bench=%s", model);
    if (pipe(fds) < 0) {
        perror(who);
        exit(1);
    }
    bench_moed_pid = fork();
    if (bench_moed_pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        if (shm_sock)
            execl(bin, "moed", "--listen", "127.0.0.1:0", "--shm-socket", shm_sock, "--model", spec,
                  "--batch-window-us", "1", "--log-level", "warn", (char *)NULL);
        else
            execl(bin, "moed", "--listen", "127.0.0.1:0", "--model", spec, "--batch-window-us", "1",
                  "--log-level", "warn", (char *)NULL);
        _exit(127);
    }
    bench_moed_owner = getpid();
    atexit(bench_moed_stop);
    close(fds[1]);
    f = fdopen(fds[0], "r");
    if (!f || !fgets(line, sizeof(line), f) ||
        sscanf(line, "moed: listening on port %d", &port) != 1)
        why = "moed did not start";
    /* The shared-memory line comes after the port's. */
    while (!why && shm_sock && !strstr(line, "shared memory on"))
        if (!fgets(line, sizeof(line), f))
            why = "moed did not open its shared-memory socket";
    if (f)
        fclose(f);
    if (why) {
        fprintf(stderr, "%s: %s\n", who, why);
        exit(1);
    }
    return port;
}

#endif
