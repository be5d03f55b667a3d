/*
 * The shared-memory SPSC ring (ipc/ring.c): order and contents across two
 * processes sharing a memfd, with a small ring so that both sides sleep on
 * their futexes; full and empty answers; counters wrapping past 2^32; an
 * idle waiter that burns no CPU; a corrupted control block answered with
 * -EPROTO, never an out-of-bounds read; attach checks.
 */
#include "ring.h"
#include "tests.h"

#include <errno.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

struct entry {
    uint64_t seq;
    uint64_t check;
};

static void *shared(size_t bytes)
{
    int fd = memfd_create("test-ring", MFD_CLOEXEC);
    void *p;

    ASSERT_TRUE(fd >= 0);
    ASSERT_EQ(ftruncate(fd, (off_t)bytes), 0);
    p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ASSERT_TRUE(p != MAP_FAILED);
    close(fd);
    return p;
}

static double cpu_seconds(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void check_basic(void)
{
    size_t bytes = moe_ring_bytes(4, sizeof(struct entry));
    void *mem = shared(bytes);
    struct moe_ring r, r2;
    struct entry e = {0};

    ASSERT_EQ(moe_ring_init(mem, 3, sizeof(e), &r), -EINVAL);
    ASSERT_EQ(moe_ring_init(mem, 4, sizeof(e), &r), 0);
    ASSERT_EQ(moe_ring_attach(mem, 8, sizeof(e), &r2), -EPROTO);
    ASSERT_EQ(moe_ring_attach(mem, 4, sizeof(e) + 1, &r2), -EPROTO);
    ASSERT_EQ(moe_ring_attach(mem, 4, sizeof(e), &r2), 0);
    /* counters wrap past 2^32 */
    atomic_store(&r.ctl->head, UINT32_MAX - 1);
    atomic_store(&r.ctl->tail, UINT32_MAX - 1);
    ASSERT_EQ(moe_ring_pop(&r2, &e, 0), -EAGAIN);
    for (uint64_t i = 0; i < 4; i++) {
        e.seq = i;
        ASSERT_EQ(moe_ring_push(&r, &e, 0), 0);
    }
    ASSERT_EQ(moe_ring_count(&r), 4u);
    ASSERT_EQ(moe_ring_push(&r, &e, 0), -EAGAIN);
    ASSERT_EQ(moe_ring_push(&r, &e, 50), -ETIMEDOUT);
    for (uint64_t i = 0; i < 4; i++) {
        ASSERT_EQ(moe_ring_pop(&r2, &e, 0), 0);
        ASSERT_EQ(e.seq, i);
    }
    /* an idle consumer sleeps: 300 ms of waiting, almost no CPU */
    {
        double c0 = cpu_seconds();

        ASSERT_EQ(moe_ring_pop(&r2, &e, 300), -ETIMEDOUT);
        ASSERT_TRUE(cpu_seconds() - c0 < 0.1);
    }
    /* a hostile producer: tail far beyond head */
    atomic_store(&r.ctl->tail, atomic_load(&r.ctl->head) + 4 + 7);
    ASSERT_EQ(moe_ring_pop(&r2, &e, 0), -EPROTO);
    ASSERT_EQ(moe_ring_push(&r, &e, 0), -EPROTO);
    munmap(mem, bytes);
}

/* Producer in a child process, consumer here: N entries in order through a
 * ring of 8, so that both sides wait on their futexes. */
static void check_two_processes(void)
{
    enum { N = 200000 };
    size_t bytes = moe_ring_bytes(8, sizeof(struct entry));
    void *mem = shared(bytes);
    struct moe_ring r;
    pid_t pid;
    int status;

    ASSERT_EQ(moe_ring_init(mem, 8, sizeof(struct entry), &r), 0);
    pid = fork();
    ASSERT_TRUE(pid >= 0);
    if (pid == 0) {
        struct moe_ring w;

        if (moe_ring_attach(mem, 8, sizeof(struct entry), &w) != 0)
            _exit(2);
        for (uint64_t i = 0; i < N; i++) {
            struct entry e = {i, i * 2654435761u};

            if (moe_ring_push(&w, &e, 10000) != 0)
                _exit(3);
            if (i % 50000 == 0)
                usleep(20000); /* let the consumer fall asleep */
        }
        _exit(0);
    }
    for (uint64_t i = 0; i < N; i++) {
        struct entry e;

        ASSERT_EQ(moe_ring_pop(&r, &e, 10000), 0);
        ASSERT_EQ(e.seq, i);
        ASSERT_EQ(e.check, i * 2654435761u);
        if (i % 70000 == 0)
            usleep(20000); /* let the producer fill the ring and sleep */
    }
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ASSERT_EQ(moe_ring_count(&r), 0u);
    munmap(mem, bytes);
}

int main(void)
{
    check_basic();
    check_two_processes();
    printf("ok\n");
    return 0;
}
