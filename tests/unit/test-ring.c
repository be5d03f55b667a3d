/*
 * The shared-memory SPSC ring (ipc/ring.c): order and contents across two
 * processes sharing a memfd, with a small ring so that both sides sleep on
 * their futexes, and data of the caller's written for a slot between
 * reserve and commit and read between peek and release; full and empty
 * answers; the sequence-word discipline (slots reused many laps over,
 * counters wrapping past 2^32, each slot's word MOE_RING_SEQ of its
 * position); an idle waiter that burns no CPU; hostile words written by
 * the other side (tail, head, sequence words, the whole ring filled with
 * noise) answered with -EPROTO or ignored, never an out-of-bounds access;
 * attach checks.
 */
#include "ring.h"
#include "tests.h"

#include <errno.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* An entry: the ring owns the first 4 bytes. */
struct entry {
    uint32_t ring_seq;
    uint32_t pad;
    uint64_t n;
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

static _Atomic uint32_t *seq_of_slot(const struct moe_ring *r, uint32_t slot)
{
    return (_Atomic uint32_t *)(r->entries + (size_t)slot * r->entry_size);
}

static void check_basic(void)
{
    size_t bytes = moe_ring_bytes(4, sizeof(struct entry));
    void *mem = shared(bytes);
    struct moe_ring r, r2;
    struct entry e = {0}, f;
    int slot;

    ASSERT_EQ(moe_ring_init(mem, 3, sizeof(e), &r), -EINVAL);
    ASSERT_EQ(moe_ring_init(mem, 4, 4, &r), -EINVAL);  /* no room past the sequence word */
    ASSERT_EQ(moe_ring_init(mem, 4, 10, &r), -EINVAL); /* not a multiple of 4 */
    ASSERT_EQ(moe_ring_init(mem, 4, sizeof(e), &r), 0);
    ASSERT_EQ(moe_ring_attach(mem, 8, sizeof(e), &r2), -EPROTO);
    ASSERT_EQ(moe_ring_attach(mem, 4, sizeof(e) + 4, &r2), -EPROTO);
    ASSERT_EQ(moe_ring_attach(mem, 4, sizeof(e), &r2), 0);
    /* counters wrap past 2^32: both views start where the control block says */
    atomic_store(&r.ctl->head, UINT32_MAX - 1);
    atomic_store(&r.ctl->tail, UINT32_MAX - 1);
    ASSERT_EQ(moe_ring_attach(mem, 4, sizeof(e), &r), 0);
    ASSERT_EQ(moe_ring_attach(mem, 4, sizeof(e), &r2), 0);
    ASSERT_EQ(moe_ring_pop(&r2, &e, 0), -EAGAIN);
    for (uint64_t i = 0; i < 4; i++) {
        e.n = i;
        e.ring_seq = 12345; /* the ring's: ignored */
        ASSERT_EQ(moe_ring_push(&r, &e, 0), 0);
    }
    ASSERT_EQ(moe_ring_count(&r), 4u);
    ASSERT_EQ(moe_ring_push(&r, &e, 0), -EAGAIN);
    ASSERT_EQ(moe_ring_push(&r, &e, 50), -ETIMEDOUT);
    /* peek twice: the same entry, the same slot; then release */
    slot = moe_ring_peek(&r2, &e, 0);
    ASSERT_EQ(slot, (int)((UINT32_MAX - 1) & 3));
    ASSERT_EQ(moe_ring_peek(&r2, &f, 0), slot);
    ASSERT_EQ(memcmp(&e, &f, sizeof(e)), 0);
    ASSERT_EQ(e.n, 0u);
    ASSERT_EQ(e.ring_seq, MOE_RING_SEQ(UINT32_MAX - 1));
    moe_ring_release(&r2);
    /* reserve twice: the same slot, the one just released */
    ASSERT_EQ(moe_ring_reserve(&r, 0), slot);
    ASSERT_EQ(moe_ring_reserve(&r, 0), slot);
    e.n = 4;
    moe_ring_commit(&r, &e);
    for (uint64_t i = 1; i < 5; i++) {
        ASSERT_EQ(moe_ring_pop(&r2, &e, 0), 0);
        ASSERT_EQ(e.n, i);
    }
    ASSERT_EQ(moe_ring_count(&r), 0u);
    ASSERT_EQ(atomic_load(&r.ctl->tail), 3u); /* wrapped */
    /* an idle consumer sleeps: 300 ms of waiting, almost no CPU */
    {
        double c0 = cpu_seconds();

        ASSERT_EQ(moe_ring_pop(&r2, &e, 300), -ETIMEDOUT);
        ASSERT_TRUE(cpu_seconds() - c0 < 0.1);
    }
    /* a hostile producer, tail far beyond head: a poll does not look at
     * tail (nothing to take), a wait does before it sleeps */
    atomic_store(&r.ctl->tail, atomic_load(&r.ctl->head) + 4 + 7);
    ASSERT_EQ(moe_ring_pop(&r2, &e, 0), -EAGAIN);
    ASSERT_EQ(moe_ring_pop(&r2, &e, 20), -EPROTO);
    atomic_store(&r.ctl->tail, 3);
    /* a hostile consumer, head beyond tail: found when the producer's last
     * look at head leaves no room and it looks again */
    for (int i = 0; i < 4; i++)
        ASSERT_EQ(moe_ring_push(&r, &e, 0), 0);
    atomic_store(&r.ctl->head, atomic_load(&r.ctl->tail) + 7);
    ASSERT_EQ(moe_ring_push(&r, &e, 0), -EPROTO);
    ASSERT_EQ(moe_ring_reserve(&r, 10), -EPROTO);
    munmap(mem, bytes);
}

/* The sequence words: a ring of 4 reused over thousands of laps, across the
 * 2^32 wrap of the positions, in batches of 1 to 4; a hostile word in the
 * slot the consumer waits on. */
static void check_seq(void)
{
    enum { CAP = 4, N = 40000 };
    size_t bytes = moe_ring_bytes(CAP, sizeof(struct entry));
    void *mem = shared(bytes);
    struct moe_ring p, c;
    struct entry e = {0};
    uint64_t pushed = 0, popped = 0;
    uint32_t start = UINT32_MAX - N / 2, pos;

    ASSERT_EQ(moe_ring_init(mem, CAP, sizeof(e), &p), 0);
    atomic_store(&p.ctl->head, start);
    atomic_store(&p.ctl->tail, start);
    ASSERT_EQ(moe_ring_attach(mem, CAP, sizeof(e), &p), 0);
    ASSERT_EQ(moe_ring_attach(mem, CAP, sizeof(e), &c), 0);
    for (unsigned round = 0; popped < N; round++) {
        unsigned batch = 1 + round % CAP;

        for (unsigned k = 0; k < batch; k++) {
            e.n = pushed;
            e.check = pushed * 2654435761u;
            ASSERT_EQ(moe_ring_push(&p, &e, 0), 0);
            /* the word of the slot just filled is its position's */
            pos = start + (uint32_t)pushed;
            ASSERT_EQ(atomic_load(seq_of_slot(&p, pos & (CAP - 1))), MOE_RING_SEQ(pos));
            pushed++;
        }
        if (batch == CAP)
            ASSERT_EQ(moe_ring_push(&p, &e, 0), -EAGAIN);
        for (unsigned k = 0; k < batch; k++) {
            ASSERT_EQ(moe_ring_pop(&c, &e, 0), 0);
            ASSERT_EQ(e.n, popped);
            ASSERT_EQ(e.check, popped * 2654435761u);
            ASSERT_EQ(e.ring_seq, MOE_RING_SEQ(start + (uint32_t)popped));
            popped++;
        }
        ASSERT_EQ(moe_ring_pop(&c, &e, 0), -EAGAIN);
    }
    ASSERT_TRUE(start + (uint32_t)popped < start); /* crossed the 2^32 wrap */
    ASSERT_EQ(atomic_load(&p.ctl->head), start + (uint32_t)popped);
    ASSERT_EQ(moe_ring_count(&c), 0u);

    /* Hostile words in the slot the consumer waits on (position pos). */
    pos = c.head;
    {
        _Atomic uint32_t *w = seq_of_slot(&c, pos & (CAP - 1));
        uint32_t prev = atomic_load(w);

        ASSERT_EQ(prev, MOE_RING_SEQ(pos - CAP)); /* the last lap's: not ready */
        atomic_store(w, 0);                       /* never written: not ready */
        ASSERT_EQ(moe_ring_pop(&c, &e, 0), -EAGAIN);
        atomic_store(w, MOE_RING_SEQ(pos + CAP)); /* a lap ahead: impossible */
        ASSERT_EQ(moe_ring_pop(&c, &e, 0), -EPROTO);
        atomic_store(w, 0x12345678u); /* even: no producer writes it */
        ASSERT_EQ(moe_ring_peek(&c, &e, 0), -EPROTO);
        ASSERT_EQ(moe_ring_pop(&c, &e, 30), -EPROTO); /* also when waiting */
        /* the right word, written by someone: taken (and checked by the
         * caller like any entry), the ring goes on */
        atomic_store(w, MOE_RING_SEQ(pos));
        ASSERT_EQ(moe_ring_pop(&c, &e, 0), 0);
        ASSERT_EQ(e.ring_seq, MOE_RING_SEQ(pos));
        /* a word in another slot is not looked at */
        atomic_store(seq_of_slot(&c, (pos + 2) & (CAP - 1)), 0x77u);
        ASSERT_EQ(moe_ring_pop(&c, &e, 0), -EAGAIN);
    }
    munmap(mem, bytes);
}

/* Noise written over the whole ring, control block and entries, again and
 * again: every call answers 0, -EAGAIN or -EPROTO and touches nothing
 * outside the ring (the sanitizer build checks that). */
static void check_noise(void)
{
    enum { CAP = 8 };
    size_t bytes = moe_ring_bytes(CAP, sizeof(struct entry));
    uint8_t *mem = shared(bytes);
    struct moe_ring p, c;
    struct entry e = {0};
    uint64_t x = 88172645463325252ull;
    int rc;

    ASSERT_EQ(moe_ring_init(mem, CAP, sizeof(e), &p), 0);
    ASSERT_EQ(moe_ring_attach(mem, CAP, sizeof(e), &c), 0);
    for (int round = 0; round < 2000; round++) {
        for (size_t i = 0; i < bytes; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            /* some rounds keep small words, so that matches happen */
            mem[i] = round % 3 ? (uint8_t)x : (uint8_t)(x & 3);
        }
        for (int k = 0; k < 4; k++) {
            rc = moe_ring_peek(&c, &e, 0);
            ASSERT_TRUE(rc == -EAGAIN || rc == -EPROTO || (rc >= 0 && rc < CAP));
            if (rc >= 0)
                moe_ring_release(&c);
            rc = moe_ring_reserve(&p, 0);
            ASSERT_TRUE(rc == -EAGAIN || rc == -EPROTO || (rc >= 0 && rc < CAP));
            if (rc >= 0)
                moe_ring_commit(&p, &e);
            (void)moe_ring_count(&c);
        }
        if (round % 500 == 0) { /* waits too (short) */
            rc = moe_ring_pop(&c, &e, 1);
            ASSERT_TRUE(rc == 0 || rc == -ETIMEDOUT || rc == -EPROTO);
        }
    }
    munmap(mem, bytes);
}

/* Producer in a child process, consumer here: N entries in order through a
 * ring of 8, so that both sides wait on their futexes.  With each entry the
 * producer writes a word of its own for the slot (side[slot]) between
 * reserve and commit; the consumer reads it between peek and release, so
 * it must always belong to the entry peeked. */
static void check_two_processes(void)
{
    enum { N = 200000, CAP = 8 };
    size_t bytes = moe_ring_bytes(CAP, sizeof(struct entry));
    uint8_t *mem = shared(bytes + CAP * sizeof(uint64_t));
    volatile uint64_t *side = (volatile uint64_t *)(mem + bytes);
    struct moe_ring r;
    pid_t pid;
    int status;

    ASSERT_EQ(moe_ring_init(mem, CAP, sizeof(struct entry), &r), 0);
    pid = fork();
    ASSERT_TRUE(pid >= 0);
    if (pid == 0) {
        struct moe_ring w;
        int slot;

        if (moe_ring_attach(mem, CAP, sizeof(struct entry), &w) != 0)
            _exit(2);
        for (uint64_t i = 0; i < N; i++) {
            struct entry e = {.n = i, .check = i * 2654435761u};

            slot = moe_ring_reserve(&w, 30000);
            if (slot < 0 || slot >= CAP) {
                fprintf(stderr, "reserve of entry %llu: %d (%s)\n", (unsigned long long)i, slot,
                        slot < 0 ? strerror(-slot) : "out of range");
                _exit(3);
            }
            side[slot] = ~i;
            moe_ring_commit(&w, &e);
            if (i % 50000 == 0)
                usleep(20000); /* let the consumer fall asleep */
        }
        _exit(0);
    }
    for (uint64_t i = 0; i < N; i++) {
        struct entry e;
        /* 30 s: only a stall of the other process for that long fails. */
        int slot = moe_ring_peek(&r, &e, 30000);

        if (slot < 0 || slot >= CAP)
            fprintf(stderr, "peek of entry %llu: %d (%s)\n", (unsigned long long)i, slot,
                    slot < 0 ? strerror(-slot) : "out of range");
        ASSERT_TRUE(slot >= 0 && slot < CAP);
        ASSERT_EQ(e.n, i);
        ASSERT_EQ(e.check, i * 2654435761u);
        ASSERT_EQ(side[slot], ~i);
        moe_ring_release(&r);
        if (i % 70000 == 0)
            usleep(20000); /* let the producer fill the ring and sleep */
    }
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ASSERT_EQ(moe_ring_count(&r), 0u);
    munmap(mem, bytes + CAP * sizeof(uint64_t));
}

/*
 * The lost wake-up: a consumer that announced its sleep and re-checked the
 * ring, but has not yet called FUTEX_WAIT, when the producer commits.  The
 * commit's wake finds no one in the futex, so it must change the sleeping
 * word: the consumer's FUTEX_WAIT on 1 then returns at once (EAGAIN)
 * instead of sleeping until its timeout.
 */
static void check_wake_before_wait(void)
{
    size_t bytes = moe_ring_bytes(4, sizeof(struct entry));
    void *mem = shared(bytes);
    struct moe_ring p, c;
    struct entry e = {.n = 1};
    struct timespec t0, t1, ts = {.tv_sec = 2};
    long rc;
    int err;

    ASSERT_EQ(moe_ring_init(mem, 4, sizeof(e), &p), 0);
    ASSERT_EQ(moe_ring_attach(mem, 4, sizeof(e), &c), 0);
    for (int side = 0; side < 2; side++) {
        _Atomic uint32_t *w = side ? &p.ctl->producer_sleeping : &c.ctl->consumer_sleeping;

        /* The waiter's announcement (wait_for: the store, then the re-check). */
        atomic_store(w, 1);
        if (side == 0) {
            ASSERT_EQ(moe_ring_push(&p, &e, 0), 0); /* the producer's publish and wake */
        } else {
            for (int i = 0; i < 3; i++)
                ASSERT_EQ(moe_ring_push(&p, &e, 0), 0);
            ASSERT_EQ(moe_ring_pop(&c, &e, 0), 0); /* the consumer's release and wake */
        }
        clock_gettime(CLOCK_MONOTONIC, &t0);
        rc = syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT, 1, &ts, NULL, 0);
        err = errno;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        /* EAGAIN: the word is no longer 1; a wake that left it 1 sleeps 2 s. */
        ASSERT_EQ(rc, -1L);
        ASSERT_EQ(err, EAGAIN);
        ASSERT_TRUE((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec) <
                    1000000000L);
        while (moe_ring_pop(&c, &e, 0) == 0)
            ;
    }
    munmap(mem, bytes);
}

int main(void)
{
    check_basic();
    check_seq();
    check_noise();
    check_wake_before_wait();
    check_two_processes();
    printf("ok\n");
    return 0;
}
