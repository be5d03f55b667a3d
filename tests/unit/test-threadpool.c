/*
 * Tests of engine/threadpool.c: every task runs exactly once, on a valid
 * thread index, for many sizes and pool sizes; pools are reused; a pool of
 * one thread runs everything on the caller; two caller threads sharing a
 * pool are serialised correctly.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "tests.h"
#include "threadpool.h"

struct count_ctx {
    atomic_int *hits;      /* [n_tasks] */
    atomic_int bad_thread; /* tasks that saw an out-of-range thread index */
    int n_threads;
    pthread_t caller;
    atomic_int on_caller; /* tasks run on the calling thread */
};

static void count_task(void *arg, int task, int thread)
{
    struct count_ctx *c = arg;

    /* Relaxed: the pool's own release/acquire makes the counts visible to
     * the caller after moe_threadpool_run() returns. */
    atomic_fetch_add_explicit(&c->hits[task], 1, memory_order_relaxed);
    if (thread < 0 || thread >= c->n_threads)
        atomic_fetch_add_explicit(&c->bad_thread, 1, memory_order_relaxed);
    if (pthread_equal(pthread_self(), c->caller)) {
        atomic_fetch_add_explicit(&c->on_caller, 1, memory_order_relaxed);
        if (thread != 0)
            atomic_fetch_add_explicit(&c->bad_thread, 1, memory_order_relaxed);
    }
}

/* Runs n_tasks on p and checks each ran exactly once; returns the number run
 * on the caller. */
static int run_and_check(struct moe_threadpool *p, int n_tasks)
{
    struct count_ctx c = {.n_threads = moe_threadpool_size(p), .caller = pthread_self()};

    c.hits = calloc((size_t)(n_tasks > 0 ? n_tasks : 1), sizeof(*c.hits));
    ASSERT_TRUE(c.hits != NULL);
    moe_threadpool_run(p, n_tasks, count_task, &c);
    for (int i = 0; i < n_tasks; i++) {
        int h = atomic_load_explicit(&c.hits[i], memory_order_relaxed);

        if (h != 1)
            FAIL("pool of %d, %d tasks: task %d ran %d times", c.n_threads, n_tasks, i, h);
    }
    ASSERT_EQ(atomic_load_explicit(&c.bad_thread, memory_order_relaxed), 0);
    free(c.hits);
    return atomic_load_explicit(&c.on_caller, memory_order_relaxed);
}

static void test_sizes(void)
{
    static const int pool_sizes[] = {1, 2, 3, 4, 8};
    static const int task_counts[] = {0, 1, 2, 3, 5, 7, 16, 64, 100, 1000, 10007};

    for (size_t i = 0; i < MOE_ARRAY_SIZE(pool_sizes); i++) {
        struct moe_threadpool *p;

        ASSERT_EQ(moe_threadpool_init(pool_sizes[i], &p), 0);
        ASSERT_EQ(moe_threadpool_size(p), pool_sizes[i]);
        /* sequential reuse of the same pool, several rounds */
        for (int round = 0; round < 3; round++)
            for (size_t j = 0; j < MOE_ARRAY_SIZE(task_counts); j++)
                run_and_check(p, task_counts[j]);
        /* many small loops back to back (workers spinning or asleep) */
        for (int k = 0; k < 2000; k++)
            run_and_check(p, 1 + k % 9);
        moe_threadpool_free(p);
    }
}

/* A loop started right after init, before the workers have run at all. */
static void test_run_right_after_init(void)
{
    for (int i = 0; i < 300; i++) {
        struct moe_threadpool *p;

        ASSERT_EQ(moe_threadpool_init(2 + i % 3, &p), 0);
        run_and_check(p, 10);
        moe_threadpool_free(p);
    }
}

static void test_single_thread(void)
{
    struct moe_threadpool *p;

    ASSERT_EQ(moe_threadpool_init(1, &p), 0);
    ASSERT_EQ(moe_threadpool_size(p), 1);
    ASSERT_EQ(run_and_check(p, 50), 50);
    moe_threadpool_free(p);
}

static void test_default_size(void)
{
    struct moe_threadpool *p;

    ASSERT_EQ(moe_threadpool_init(0, &p), 0);
    ASSERT_TRUE(moe_threadpool_size(p) >= 1);
    run_and_check(p, 123);
    moe_threadpool_free(p);
    ASSERT_EQ(moe_threadpool_init(-1, &p), 0);
    ASSERT_TRUE(moe_threadpool_size(p) >= 1);
    moe_threadpool_free(p);
    ASSERT_EQ(moe_threadpool_init(1 << 20, &p), -EINVAL);
    moe_threadpool_free(NULL);
}

/* Tasks that sleep a little, so that workers really share the loop. */
static void slow_task(void *arg, int task, int thread)
{
    atomic_int *per_thread = arg;
    struct timespec ts = {0, 200000};

    (void)task;
    nanosleep(&ts, NULL);
    atomic_fetch_add_explicit(&per_thread[thread], 1, memory_order_relaxed);
}

static void test_workers_take_part(void)
{
    struct moe_threadpool *p;
    atomic_int per_thread[3] = {0};

    ASSERT_EQ(moe_threadpool_init(3, &p), 0);
    moe_threadpool_run(p, 60, slow_task, per_thread);
    ASSERT_EQ(per_thread[0] + per_thread[1] + per_thread[2], 60);
    /* with 0.2 ms tasks every thread gets some */
    for (int i = 0; i < 3; i++)
        if (per_thread[i] == 0)
            FAIL("thread %d ran no task of 60 slow ones", i);
    moe_threadpool_free(p);
}

struct caller_arg {
    struct moe_threadpool *p;
    int rounds;
};

static void *caller_main(void *arg)
{
    struct caller_arg *a = arg;

    for (int i = 0; i < a->rounds; i++)
        run_and_check(a->p, 1 + (i * 37) % 200);
    return NULL;
}

/* Two threads run loops on one pool at the same time. */
static void test_two_callers(void)
{
    for (int n = 1; n <= 3; n++) {
        struct moe_threadpool *p;
        pthread_t th[2];
        struct caller_arg a = {.rounds = 500};

        ASSERT_EQ(moe_threadpool_init(n, &p), 0);
        a.p = p;
        for (int i = 0; i < 2; i++)
            ASSERT_EQ(pthread_create(&th[i], NULL, caller_main, &a), 0);
        for (int i = 0; i < 2; i++)
            ASSERT_EQ(pthread_join(th[i], NULL), 0);
        moe_threadpool_free(p);
    }
}

/* A sum computed through the pool matches the serial one (the pool's
 * ordering publishes task results to the caller). */
struct sum_ctx {
    const int64_t *v;
    int64_t *partial;
    int chunk, n;
};

static void sum_task(void *arg, int task, int thread)
{
    struct sum_ctx *c = arg;
    int64_t s = 0;

    (void)thread;
    for (int i = task * c->chunk; i < MOE_MIN((task + 1) * c->chunk, c->n); i++)
        s += c->v[i];
    c->partial[task] = s;
}

static void test_results_visible(void)
{
    enum { N = 100000, CHUNK = 1000 };
    struct moe_threadpool *p;
    int64_t *v = malloc(N * sizeof(*v)), partial[N / CHUNK], want = 0;
    struct sum_ctx c = {.v = v, .partial = partial, .chunk = CHUNK, .n = N};

    ASSERT_TRUE(v != NULL);
    for (int i = 0; i < N; i++) {
        v[i] = i * 7 - 3;
        want += v[i];
    }
    ASSERT_EQ(moe_threadpool_init(2, &p), 0);
    for (int round = 0; round < 200; round++) {
        int64_t got = 0;

        memset(partial, 0xff, sizeof(partial));
        moe_threadpool_run(p, N / CHUNK, sum_task, &c);
        for (int i = 0; i < N / CHUNK; i++)
            got += partial[i];
        ASSERT_EQ(got, want);
    }
    moe_threadpool_free(p);
    free(v);
}

int main(void)
{
    /* a lost wake-up hangs; fail instead (SIGALRM terminates) */
    alarm(120);
    test_run_right_after_init();
    test_sizes();
    test_single_thread();
    test_default_size();
    test_workers_take_part();
    test_two_callers();
    test_results_visible();
    printf("threadpool: ok\n");
    return 0;
}
