/*
 * The cluster's work queue (cluster_int.h struct cl_pool): items run once
 * each on threads of the queue's own, started as needed up to a cap and
 * kept until the queue is freed; the split forwards, their parts and the
 * peers' rows over NCCL each have one.
 */
#include "cluster_int.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

static void *pool_main(void *arg)
{
    struct cl_pool *p = arg;

    pthread_mutex_lock(&p->lock);
    for (;;) {
        struct cl_work *w = p->head;

        if (!w) {
            if (p->stopping)
                break;
            p->idle++;
            pthread_cond_wait(&p->cond, &p->lock);
            p->idle--;
            continue;
        }
        p->head = w->next;
        if (!p->head)
            p->tail = NULL;
        p->queued--;
        pthread_mutex_unlock(&p->lock);
        w->run(w); /* w may be gone after this */
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int moed_cl_pool_init(struct cl_pool *p, int max_threads, int max_waiting)
{
    p->threads = calloc((size_t)max_threads, sizeof(*p->threads));
    if (!p->threads)
        return -ENOMEM;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->max_threads = max_threads;
    p->max_waiting = max_waiting;
    p->inited = true;
    return 0;
}

int moed_cl_pool_post(struct cl_pool *p, struct cl_work *w)
{
    int r = 0;

    pthread_mutex_lock(&p->lock);
    if (p->idle <= p->queued) {
        /* No idle thread left for it: another, else it waits (if it may). */
        if (p->n_threads < p->max_threads &&
            pthread_create(&p->threads[p->n_threads], NULL, pool_main, p) == 0)
            p->n_threads++;
        else if (p->n_threads == 0 || p->queued - p->idle >= p->max_waiting)
            r = -EAGAIN;
    }
    if (r == 0) {
        w->next = NULL;
        if (p->tail)
            p->tail->next = w;
        else
            p->head = w;
        p->tail = w;
        p->queued++;
        pthread_cond_signal(&p->cond);
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

void moed_cl_pool_free(struct cl_pool *p)
{
    if (!p->inited)
        return;
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->lock);
    free(p->threads);
    p->threads = NULL;
    p->inited = false;
}
