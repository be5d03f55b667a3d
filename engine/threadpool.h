/*
 * A fixed pool of worker threads for data-parallel loops.  The calling
 * thread takes part in every loop, so a pool of n threads starts n - 1
 * workers.  Idle workers sleep on a condition variable and burn no CPU.
 * One loop runs at a time per pool: moe_threadpool_run() is serialised by
 * the pool's own lock, so several callers may share a pool.
 */
#ifndef MOED_ENGINE_THREADPOOL_H
#define MOED_ENGINE_THREADPOOL_H

struct moe_threadpool;

/* fn(ctx, task, thread): task in [0, n_tasks), thread in [0, n_threads). */
typedef void (*moe_task_fn)(void *ctx, int task, int thread);

/* n_threads <= 0: one per online CPU.  Returns 0 or -errno. */
int moe_threadpool_init(int n_threads, struct moe_threadpool **ret);
void moe_threadpool_free(struct moe_threadpool *p);
int moe_threadpool_size(const struct moe_threadpool *p);

/* Runs fn for every task, spread over the pool's threads (tasks are handed
 * out dynamically from an atomic counter), and returns when all are done. */
void moe_threadpool_run(struct moe_threadpool *p, int n_tasks, moe_task_fn fn, void *ctx);

#endif
