/*
 * The NCCL transport (kernels/moe_nccl.c): unique ids, a one-rank
 * communicator exchanging with itself (any GPU), a two-rank one between two
 * threads on two devices (where there are two), and the deadlines: a rank
 * that never joins, a receive that nothing sends.  Without a CUDA device
 * only the unique ids and the refusals are checked, then it skips (77).
 */
#include "moe_nccl.h"
#include "tests.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A check that says what failed, with the error text. */
#define CHECK_MSG(c, ...)                                                                          \
    do {                                                                                           \
        if (!(c))                                                                                  \
            FAIL(__VA_ARGS__);                                                                     \
    } while (0)

static void fill(uint8_t *p, size_t n, uint32_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        p[i] = (uint8_t)(seed >> 24);
    }
}

static void check_ids(void)
{
    uint8_t a[MOE_NCCL_ID_BYTES], b[MOE_NCCL_ID_BYTES], zero[MOE_NCCL_ID_BYTES] = {0};
    struct moe_error err = {0};

    ASSERT_TRUE(moe_nccl_unique_id(a, &err) == 0);
    ASSERT_TRUE(moe_nccl_unique_id(b, &err) == 0);
    ASSERT_TRUE(memcmp(a, b, sizeof(a)) != 0);
    ASSERT_TRUE(memcmp(a, zero, sizeof(a)) != 0);
    printf("NCCL %s: unique ids ok\n", moe_nccl_version());
}

/* A one-rank communicator sending to itself: sizes, several per group,
 * post and wait apart, and a second post that waits for the first. */
static void check_self(void)
{
    static const size_t sizes[] = {1, 255, 4096, 1000003, 3 << 20};
    uint8_t id[MOE_NCCL_ID_BYTES];
    struct moe_error err = {0};
    struct moe_nccl *c = NULL;

    ASSERT_TRUE(moe_nccl_unique_id(id, &err) == 0);
    CHECK_MSG(moe_nccl_open(id, 1, 0, 0, 20000, &c, &err) == 0, "%s", err.msg);
    ASSERT_TRUE(moe_nccl_rank(c) == 0 && moe_nccl_nranks(c) == 1 && !moe_nccl_broken(c));
    for (size_t k = 0; k < sizeof(sizes) / sizeof(*sizes); k++) {
        size_t n = sizes[k];
        uint8_t *s1 = malloc(n), *s2 = malloc(n + 7), *r1 = malloc(n), *r2 = malloc(n + 7);
        struct moe_nccl_xfer snd[2] = {{0, s1, n}, {0, s2, n + 7}};
        struct moe_nccl_xfer rcv[2] = {{0, r1, n}, {0, r2, n + 7}};

        ASSERT_TRUE(s1 && s2 && r1 && r2);
        fill(s1, n, (uint32_t)k);
        fill(s2, n + 7, (uint32_t)k + 100);
        memset(r1, 0, n);
        memset(r2, 0, n + 7);
        CHECK_MSG(moe_nccl_exchange(c, snd, 2, rcv, 2, 20000, &err) == 0, "%s", err.msg);
        /* Matched in order: the first send to the first receive. */
        ASSERT_TRUE(memcmp(s1, r1, n) == 0);
        ASSERT_TRUE(memcmp(s2, r2, n + 7) == 0);
        /* Post, scribble over the send buffer (copied out), wait. */
        memset(r1, 0, n);
        ASSERT_TRUE(moe_nccl_post(c, snd, 1, rcv, 1, 20000, &err) == 0);
        fill(s2, n, 7); /* not s1: compare against a copy below */
        uint8_t *copy = malloc(n);

        ASSERT_TRUE(copy);
        memcpy(copy, s1, n);
        memset(s1, 0xee, n);
        ASSERT_TRUE(moe_nccl_wait(c, 20000, &err) == 0);
        ASSERT_TRUE(memcmp(copy, r1, n) == 0);
        /* Two posts in a row: the second waits for the first. */
        memcpy(s1, copy, n);
        memset(r1, 0, n);
        memset(r2, 0, n);
        struct moe_nccl_xfer rcv2 = {0, r2, n};

        ASSERT_TRUE(moe_nccl_post(c, snd, 1, rcv, 1, 20000, &err) == 0);
        ASSERT_TRUE(moe_nccl_post(c, snd, 1, &rcv2, 1, 20000, &err) == 0);
        ASSERT_TRUE(memcmp(copy, r1, n) == 0); /* landed when the second post waited */
        ASSERT_TRUE(moe_nccl_wait(c, 20000, &err) == 0);
        ASSERT_TRUE(memcmp(copy, r2, n) == 0);
        free(copy);
        free(s1);
        free(s2);
        free(r1);
        free(r2);
    }
    /* A wait with nothing posted. */
    ASSERT_TRUE(moe_nccl_wait(c, 10, &err) == 0);
    /* A bad rank posts nothing and breaks nothing. */
    {
        uint8_t b = 1;
        struct moe_nccl_xfer bad = {1, &b, 1};

        ASSERT_TRUE(moe_nccl_post(c, &bad, 1, NULL, 0, 1000, &err) == -EINVAL);
        ASSERT_TRUE(strstr(err.msg, "rank 1 of 1"));
        ASSERT_TRUE(!moe_nccl_broken(c));
    }
    /* A receive that nothing sends: refused by NCCL at the post (a rank
     * cannot receive from itself without a send), or the deadline; broken
     * for good either way. */
    {
        uint8_t b = 0;
        struct moe_nccl_xfer r = {0, &b, 1};
        uint64_t t0 = moe_now_ns();
        int rc = moe_nccl_post(c, NULL, 0, &r, 1, 1000, &err);

        if (rc == 0)
            rc = moe_nccl_wait(c, 300, &err);
        CHECK_MSG(rc == -EIO || rc == -ETIMEDOUT, "a lone receive: %d %s", rc, err.msg);
        ASSERT_TRUE(moe_now_ns() - t0 < 20000000000ull);
        ASSERT_TRUE(moe_nccl_broken(c));
        ASSERT_TRUE(moe_nccl_post(c, NULL, 0, &r, 1, 1000, &err) == -EIO);
        ASSERT_TRUE(strstr(err.msg, "broken"));
    }
    moe_nccl_close(c);
    printf("one rank: exchanges with itself ok, deadlines ok\n");
}

/* Two ranks, one missing: joining times out instead of hanging. */
static void check_join_timeout(void)
{
    uint8_t id[MOE_NCCL_ID_BYTES];
    struct moe_error err = {0};
    struct moe_nccl *c = NULL;
    uint64_t t0 = moe_now_ns();

    ASSERT_TRUE(moe_nccl_unique_id(id, &err) == 0);
    ASSERT_TRUE(moe_nccl_open(id, 2, 0, 0, 1000, &c, &err) == -ETIMEDOUT);
    ASSERT_TRUE(c == NULL);
    ASSERT_TRUE(moe_now_ns() - t0 < 30000000000ull);
    printf("a rank that never joins: %s\n", err.msg);
}

struct rank_arg {
    const uint8_t *id;
    int rank;
    pthread_barrier_t *bar;
    int rc;
    char msg[MOE_ERROR_MSG_MAX];
};

/* Two ranks as moed uses them: the sender posts its rows and returns;
 * only then (the barrier stands for the gRPC call) does the receiver post
 * its receive, compute, and post the answer, which the sender takes after.
 * 20 rounds each way, sizes changing; then a receive nobody matches runs
 * into its deadline. */
static void *rank_main(void *arg)
{
    struct rank_arg *a = arg;
    struct moe_error err = {0};
    struct moe_nccl *c = NULL;
    /* 40 rounds of about 5 MB, then one of 40 MB: beyond the staging made
     * at join, so that it grows. */
    size_t big = 40 << 20, n = 5 << 20;
    uint8_t *s = malloc(big), *r = malloc(big), *want = malloc(big);
    int other = 1 - a->rank, rc = -ENOMEM;

    if (s && r && want)
        rc = moe_nccl_open(a->id, 2, a->rank, a->rank, 60000, &c, &err);
    else
        moe_error_set(&err, -ENOMEM, "out of memory");
    pthread_barrier_wait(a->bar);
    /* Every round meets the barriers, also after a failure: no hang. */
    for (int round = 0; round < 41; round++) {
        int sender = round % 2;
        size_t len = round < 40 ? n - (size_t)round * 4099 : big;
        struct moe_nccl_xfer snd = {other, s, len}, rcv = {other, r, len};

        if (a->rank == sender) {
            if (rc == 0)
                fill(s, len, (uint32_t)round);
            if (rc == 0)
                rc = moe_nccl_post(c, &snd, 1, NULL, 0, 60000, &err); /* the rows */
            pthread_barrier_wait(a->bar);                             /* "ForwardExperts" */
            pthread_barrier_wait(a->bar);                             /* its answer */
            if (rc == 0)
                rc = moe_nccl_exchange(c, NULL, 0, &rcv, 1, 60000, &err);
            if (rc == 0)
                fill(want, len, (uint32_t)round + 1000);
        } else {
            pthread_barrier_wait(a->bar);
            if (rc == 0)
                rc = moe_nccl_exchange(c, NULL, 0, &rcv, 1, 60000, &err);
            if (rc == 0)
                fill(want, len, (uint32_t)round);
            if (rc == 0 && memcmp(r, want, len) != 0)
                rc = moe_error_set(&err, -EBADMSG, "round %d: wrong rows", round);
            if (rc == 0)
                fill(s, len, (uint32_t)round + 1000);
            if (rc == 0)
                rc = moe_nccl_post(c, &snd, 1, NULL, 0, 60000, &err); /* the output */
            pthread_barrier_wait(a->bar);
            continue;
        }
        if (rc == 0 && memcmp(r, want, len) != 0)
            rc = moe_error_set(&err, -EBADMSG, "round %d: wrong output", round);
    }
    /* The last output posted (rank 1's, round 40) is taken before the
     * unmatched receive below and before either rank closes. */
    if (rc == 0)
        rc = moe_nccl_wait(c, 60000, &err);
    pthread_barrier_wait(a->bar);
    /* Rank 1 waits for rows rank 0 never sends: the deadline. */
    if (rc == 0 && a->rank == 1) {
        struct moe_nccl_xfer rcv = {0, r, 64};

        rc = moe_nccl_exchange(c, NULL, 0, &rcv, 1, 500, &err);
        rc = rc == -ETIMEDOUT && moe_nccl_broken(c)
                 ? 0
                 : moe_error_set(&err, -EPROTO, "an unmatched receive gave %d", rc);
    }
    pthread_barrier_wait(a->bar); /* nobody closes while the other still runs */
    a->rc = rc;
    moe_nccl_close(c);
    snprintf(a->msg, sizeof(a->msg), "%s", err.msg);
    free(s);
    free(r);
    free(want);
    return NULL;
}

static void check_two_devices(void)
{
    uint8_t id[MOE_NCCL_ID_BYTES];
    struct moe_error err = {0};
    pthread_barrier_t bar;
    struct rank_arg a[2] = {{.id = id, .rank = 0, .bar = &bar}, {.id = id, .rank = 1, .bar = &bar}};
    pthread_t t[2];

    ASSERT_TRUE(moe_nccl_unique_id(id, &err) == 0);
    ASSERT_TRUE(pthread_barrier_init(&bar, NULL, 2) == 0);
    for (int i = 0; i < 2; i++)
        ASSERT_TRUE(pthread_create(&t[i], NULL, rank_main, &a[i]) == 0);
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        CHECK_MSG(a[i].rc == 0, "rank %d: %s", i, a[i].msg);
    }
    pthread_barrier_destroy(&bar);
    printf("two ranks on two devices: 41 transfers in moed's order, both ways, one of 40 MB "
           "(staging grown), ok; an unmatched receive times out\n");
}

int main(void)
{
    struct moe_error err = {0};
    struct moe_nccl *c = NULL;
    uint8_t id[MOE_NCCL_ID_BYTES] = {0};

    check_ids();
    if (moe_nccl_usable(0, &err) < 0) {
        ASSERT_TRUE(strstr(err.msg, "CUDA device"));
        ASSERT_TRUE(moe_nccl_unique_id(id, &err) == 0);
        ASSERT_TRUE(moe_nccl_open(id, 1, 0, 0, 1000, &c, &err) == -ENODEV && !c);
        printf("SKIP: %s: the NCCL exchanges need a GPU\n", err.msg);
        return TEST_SKIP;
    }
    ASSERT_TRUE(moe_nccl_open(id, 1, 1, 0, 1000, &c, &err) == -EINVAL && !c);
    check_self();
    check_join_timeout();
    if (moe_nccl_usable(1, &err) == 0)
        check_two_devices();
    else
        printf("two ranks: skipped (%s)\n", err.msg);
    return 0;
}
