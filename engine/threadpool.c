/*
 * A fixed pool of worker threads for data-parallel loops (see threadpool.h).
 *
 * Owns: n_threads - 1 worker pthreads, created in moe_threadpool_init() and
 * joined in moe_threadpool_free().  The thread calling moe_threadpool_run()
 * is thread 0 of every loop; worker i is thread i.
 *
 * One loop ("job") at a time: run_lock serialises callers.  A job is
 * published by writing fn/ctx/n_tasks, resetting next_task and pending, and
 * then bumping generation with release order.  Workers notice the new
 * generation (acquire), take tasks from next_task with fetch_add until it
 * passes n_tasks, and decrement pending; the last one out wakes the caller.
 * The caller takes tasks too and then waits for pending to reach zero, so
 * when run() returns every task has finished and every worker has stopped
 * touching the job.
 *
 * Idle workers spin for a short while (a loop often follows another at once,
 * e.g. the two phases of a grouped FFN) and then sleep on `wake` under
 * `lock`, so an idle pool costs no CPU.  The caller waits the same way on
 * `done`.  Lost wake-ups are impossible because generation is bumped, and
 * pending is read for the last time, under `lock`.
 *
 * Locks: run_lock (outer) serialises moe_threadpool_run(); lock (inner)
 * guards the sleeping side of both condition variables and `stop`.
 * moe_threadpool_run() must not be called from inside a task of the same
 * pool (it would deadlock on run_lock).
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

#include "common.h"
#include "threadpool.h"

#define MOE_THREADPOOL_MAX 1024
/* How long a worker or the caller spins before sleeping. */
#define SPIN_NS 50000

struct worker {
    struct moe_threadpool *pool;
    pthread_t thread;
    int id; /* 1..n_threads-1 */
};

struct moe_threadpool {
    int n_threads;          /* including the caller */
    int n_started;          /* workers actually created (for unwinding) */
    struct worker *workers; /* [n_threads - 1] */

    pthread_mutex_t run_lock; /* serialises moe_threadpool_run() */
    pthread_mutex_t lock;     /* guards sleeping on wake/done, and stop */
    pthread_cond_t wake;      /* signalled when generation changes or stop is set */
    pthread_cond_t done;      /* signalled when pending reaches zero */
    bool stop;                /* under lock: workers exit */

    /* The current job; written by the caller before the release store of
     * generation, read by workers after the acquire load of it. */
    moe_task_fn fn;
    void *ctx;
    int n_tasks;

    atomic_uint generation; /* bumped once per job */
    atomic_int next_task;   /* next task index to hand out */
    atomic_int pending;     /* workers still inside the current job */
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* A bounded spin: spin_more() pauses the CPU and says whether to go on
 * polling, until SPIN_NS have passed (the clock is read every 64 rounds). */
struct spin {
    int i;
    uint64_t start;
};

static bool spin_more(struct spin *s)
{
    if ((s->i & 63) == 0) {
        uint64_t now = moe_now_ns();

        if (s->i == 0)
            s->start = now;
        else if (now - s->start > SPIN_NS)
            return false;
    }
    if (s->i++ > 0)
        cpu_relax();
    return true;
}

/* Takes tasks of the current job until none is left. */
static void run_tasks(struct moe_threadpool *p, int thread)
{
    int n = p->n_tasks;

    for (;;) {
        /* Relaxed: the counter only hands out distinct indices; the job it
         * indexes was published by the generation release/acquire pair. */
        int t = atomic_fetch_add_explicit(&p->next_task, 1, memory_order_relaxed);

        if (t >= n)
            break;
        p->fn(p->ctx, t, thread);
    }
}

/* Waits until generation differs from seen (returning it), or stop. */
static unsigned wait_job(struct moe_threadpool *p, unsigned seen, bool *ret_stop)
{
    unsigned g;

    for (struct spin sp = {0}; spin_more(&sp);) {
        /* Acquire: pairs with the release increment of generation in
         * moe_threadpool_run(), making fn/ctx/n_tasks visible. */
        g = atomic_load_explicit(&p->generation, memory_order_acquire);
        if (g != seen) {
            *ret_stop = false;
            return g;
        }
    }

    pthread_mutex_lock(&p->lock);
    for (;;) {
        /* Acquire: pairs with the release increment of generation in
         * moe_threadpool_run() (made under this lock, so the lock orders it
         * as well). */
        g = atomic_load_explicit(&p->generation, memory_order_acquire);
        if (g != seen || p->stop)
            break;
        pthread_cond_wait(&p->wake, &p->lock);
    }
    *ret_stop = g == seen && p->stop;
    pthread_mutex_unlock(&p->lock);
    return g;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct moe_threadpool *p = w->pool;
    /* Workers are created before the first job, at generation 0; reading
     * generation here instead could already see job 1 and miss it. */
    unsigned seen = 0;

    for (;;) {
        bool stop;

        seen = wait_job(p, seen, &stop);
        if (stop)
            break;
        run_tasks(p, w->id);
        /* Release: our task writes happen before the caller's acquire load
         * of pending in wait_done(); acquire so the last worker's signal is
         * ordered after every other worker's decrement. */
        if (atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&p->lock);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->lock);
        }
    }
    return NULL;
}

/* Waits until every worker has left the current job. */
static void wait_done(struct moe_threadpool *p)
{

    for (struct spin sp = {0}; spin_more(&sp);) {
        /* Acquire: pairs with the release decrement in worker_main(), so
         * the workers' task results are visible to the caller. */
        if (atomic_load_explicit(&p->pending, memory_order_acquire) == 0)
            return;
    }
    pthread_mutex_lock(&p->lock);
    /* Acquire: as above; the last worker decrements before taking lock to
     * signal, so reading a non-zero value here means the signal is still
     * to come. */
    while (atomic_load_explicit(&p->pending, memory_order_acquire) != 0)
        pthread_cond_wait(&p->done, &p->lock);
    pthread_mutex_unlock(&p->lock);
}

int moe_threadpool_init(int n_threads, struct moe_threadpool **ret)
{
    struct moe_threadpool *p;
    int r;

    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);

        n_threads = n > 0 ? (int)n : 1;
    }
    if (n_threads > MOE_THREADPOOL_MAX)
        return -EINVAL;

    p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    p->n_threads = n_threads;
    atomic_init(&p->generation, 0);
    atomic_init(&p->next_task, 0);
    atomic_init(&p->pending, 0);

    r = -pthread_mutex_init(&p->run_lock, NULL);
    if (r < 0)
        goto out_free;
    r = -pthread_mutex_init(&p->lock, NULL);
    if (r < 0)
        goto out_run_lock;
    r = -pthread_cond_init(&p->wake, NULL);
    if (r < 0)
        goto out_lock;
    r = -pthread_cond_init(&p->done, NULL);
    if (r < 0)
        goto out_wake;

    if (n_threads > 1) {
        p->workers = calloc((size_t)n_threads - 1, sizeof(*p->workers));
        if (!p->workers) {
            r = -ENOMEM;
            goto out_done;
        }
    }
    for (int i = 0; i < n_threads - 1; i++) {
        struct worker *w = &p->workers[i];

        w->pool = p;
        w->id = i + 1;
        r = -pthread_create(&w->thread, NULL, worker_main, w);
        if (r < 0) {
            moe_threadpool_free(p);
            return r;
        }
        p->n_started++;
    }
    *ret = p;
    return 0;

out_done:
    pthread_cond_destroy(&p->done);
out_wake:
    pthread_cond_destroy(&p->wake);
out_lock:
    pthread_mutex_destroy(&p->lock);
out_run_lock:
    pthread_mutex_destroy(&p->run_lock);
out_free:
    free(p);
    return r;
}

void moe_threadpool_free(struct moe_threadpool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    p->stop = true;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->n_started; i++)
        pthread_join(p->workers[i].thread, NULL);
    free(p->workers);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->lock);
    pthread_mutex_destroy(&p->run_lock);
    free(p);
}

int moe_threadpool_size(const struct moe_threadpool *p)
{
    return p->n_threads;
}

void moe_threadpool_run(struct moe_threadpool *p, int n_tasks, moe_task_fn fn, void *ctx)
{
    if (n_tasks <= 0)
        return;

    pthread_mutex_lock(&p->run_lock);
    /* A single task, or no workers: nothing to share, do not wake anyone. */
    if (n_tasks == 1 || p->n_threads == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        pthread_mutex_unlock(&p->run_lock);
        return;
    }

    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    /* Relaxed: published by the release increment of generation below;
     * no worker touches these until it has seen the new generation. */
    atomic_store_explicit(&p->next_task, 0, memory_order_relaxed);
    atomic_store_explicit(&p->pending, p->n_threads - 1, memory_order_relaxed);

    pthread_mutex_lock(&p->lock);
    /* Release: publishes the job fields above; pairs with the acquire load
     * of generation in wait_job(). */
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);

    run_tasks(p, 0);
    wait_done(p);
    pthread_mutex_unlock(&p->run_lock);
}
