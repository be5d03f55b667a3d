/*
 * The scheduler (scheduler.h).
 *
 * Owns: the pending list (arrival order), the worker threads, counters,
 * the memory budget (membudget.h).
 * Lock: s->lock guards the list, the flags and the counters; workers sleep
 * on s->cv (work, the end of a window, memory given back, the end of an
 * idle spell) and drainers on s->idle_cv.  Batches run without the lock.
 * The budget's own lock is a leaf, taken under s->lock.
 */
#include "scheduler.h"

#include "backend.h"
#include "membudget.h"
#include "model.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct moe_sched {
    struct moe_sched_config cfg;
    pthread_mutex_t lock;
    pthread_cond_t cv;
    pthread_cond_t idle_cv;
    struct moe_sched_req *head, *tail; /* pending, oldest first */
    int pending, running;
    bool stopping; /* no new requests */
    bool quit;     /* workers exit once pending is empty */
    /* A lone caller: the last request submitted to an idle scheduler
     * waited its whole window and none joined it, and nothing was pending
     * or running at any submit since.  While set, a request alone in an
     * idle scheduler runs at once. */
    bool lone;
    uint64_t requests, tokens, batches, failed, completed;
    uint64_t batch_requests[MOE_SCHED_HIST_BUCKETS], batch_tokens[MOE_SCHED_HIST_BUCKETS];
    uint64_t batch_requests_sum, batch_tokens_sum;
    uint64_t last_progress_ns; /* see moe_sched_stats */
    struct moe_membudget *mem;
    uint64_t mem_pending; /* estimated bytes held by pending requests */
    uint64_t mem_refused; /* submits refused for memory */
    int trims_left;       /* after a burst: times memory is still to be given
                           * back (TRIMS: at 1, 2, 4, 8 and 16 trim_idle_ns of
                           * idle, the later ones for what the transports free
                           * once a slow client has read its answer) */
    pthread_t *threads;
    int n_threads;
};

#define MIB(b) (((b) + (1u << 20) - 1) >> 20)
#define TRIMS 5

/* Per token: the request's input and output as the transports hold them,
 * with the messages that carry them in and out (6 f32 rows).  What a
 * pending request holds. */
static uint64_t held_bytes(const struct moe_model *m, int n_tokens)
{
    return 4 * 6 * (uint64_t)m->cfg.hidden * (uint64_t)MOE_MAX(1, n_tokens);
}

uint64_t moe_sched_request_bytes(const struct moe_model *m, int n_tokens)
{
    const uint64_t H = (uint64_t)m->cfg.hidden, K = (uint64_t)MOE_MAX(1, m->cfg.top_k);
    const uint64_t F = (uint64_t)MOE_MAX(m->cfg.expert_ffn, m->cfg.shared_ffn);
    const uint64_t E = (uint64_t)m->cfg.n_experts;
    /* Per token, besides what it holds: the batch's copies of input and
     * output (2 rows), the scaled inputs and outputs per routed slot and
     * the backend's prepared inputs (3 per slot); the SwiGLU rows (1 per
     * slot, and the shared expert's); the router's logits; the routing. */
    uint64_t work = 4 * (H * (2 + 3 * K) + F * (K + 1) + E) + 32 * K;

    return held_bytes(m, n_tokens) + work * (uint64_t)MOE_MAX(1, n_tokens);
}

static bool same_key(const struct moe_sched_req *a, const struct moe_sched_req *b)
{
    return a->engine == b->engine && a->a.layer == b->a.layer && !a->a.ids == !b->a.ids &&
           a->a.flags == b->a.flags;
}

/* Tokens pending for r's key (r included). */
static int key_tokens(const struct moe_sched *s, const struct moe_sched_req *r)
{
    int n = 0;

    for (const struct moe_sched_req *q = s->head; q; q = q->next_)
        if (same_key(q, r))
            n += q->a.n_tokens;
    return n;
}

/* Takes the batch of head's key out of the list: requests in arrival order
 * up to max_batch_tokens, each charged to the memory budget (the first
 * always, when its memory fits: the caller checked; *ret_mem: the bytes
 * charged). */
static struct moe_sched_req *take_batch(struct moe_sched *s, int *n_req, int *n_tok,
                                        uint64_t *ret_mem)
{
    struct moe_sched_req *first = s->head, *batch = NULL, **bt = &batch, **pp = &s->head;
    int tokens = 0, n = 0;
    uint64_t mem = 0, held = 0;

    s->tail = NULL;
    while (*pp) {
        struct moe_sched_req *q = *pp;

        if (same_key(q, first) && (n == 0 || tokens + q->a.n_tokens <= s->cfg.max_batch_tokens) &&
            (n == 0 || moe_membudget_acquire(s->mem, q->mem_) == 0)) {
            *pp = q->next_;
            q->next_ = NULL;
            *bt = q;
            bt = &q->next_;
            tokens += q->a.n_tokens;
            mem += q->mem_;
            held += q->held_;
            n++;
            continue;
        }
        s->tail = q;
        pp = &q->next_;
    }
    s->pending -= n;
    s->mem_pending -= held;
    *n_req = n;
    *n_tok = tokens;
    *ret_mem = mem;
    return batch;
}

/*
 * After a burst, idle: gives memory back (lock not held), when the burst
 * charged enough to be worth it or it is a later time (settle).  The
 * backend's scratch first, so that the heap's trim returns it too.
 * Returns whether it did.
 */
static bool give_back(struct moe_sched *s, bool settle)
{
    struct moe_backend *b = s->cfg.backend;

    if (!settle && !moe_membudget_trim_due(s->mem))
        return false;
    if (b && b->ops->trim)
        b->ops->trim(b);
    moe_membudget_trim(s->mem);
    return true;
}

static void finish(struct moe_sched_req *r, int status, const char *msg)
{
    r->done(r, status, msg);
}

/* The histogram bucket of v >= 1: ceil(log2(v)), at most the last. */
static int hist_bucket(int v)
{
    int b = v <= 1 ? 0 : 32 - __builtin_clz((unsigned)v - 1);

    return MOE_MIN(b, MOE_SCHED_HIST_BUCKETS - 1);
}

/*
 * Runs each request of a batch that failed on bad input alone, so that the
 * request whose rows were bad (an output row that overflowed) fails with
 * its own row numbers and the others get their answers.  Inputs were
 * checked at submission, so this is the rare path.
 */
static void run_alone(struct moe_sched *s, struct moe_sched_req *batch, int n_req, int n_tok,
                      uint64_t t0)
{
    uint64_t failed = 0;

    pthread_mutex_lock(&s->lock);
    s->batches++;
    s->batch_requests[hist_bucket(n_req)]++;
    s->batch_tokens[hist_bucket(n_tok)]++;
    s->batch_requests_sum += (uint64_t)n_req;
    s->batch_tokens_sum += (uint64_t)n_tok;
    pthread_mutex_unlock(&s->lock);
    for (struct moe_sched_req *q = batch, *next; q; q = next) {
        struct moe_error err = {0};
        int r;

        next = q->next_;
        q->next_ = NULL;
        r = moe_layer_forward_ex(q->engine, &q->a, &q->st, &err);
        if (r < 0)
            failed++;
        q->queue_ns = t0 - q->t_submit_;
        q->batch_requests = 1;
        q->batch_tokens = q->a.n_tokens;
        finish(q, r, r < 0 ? err.msg : NULL);
    }
    pthread_mutex_lock(&s->lock);
    s->failed += failed;
    pthread_mutex_unlock(&s->lock);
}

/* A batch's concatenated rows, from the pool (membudget.h). */
struct batch_buf {
    void *p;
    size_t cap;
};

static void *batch_buf_get(struct moe_sched *s, struct batch_buf *bb, size_t bytes)
{
    bb->p = moe_membudget_buf_get(s->mem, bytes, &bb->cap);
    return bb->p;
}

/* Runs one batch: the requests' rows concatenated into one forward. */
static void run_batch(struct moe_sched *s, struct moe_sched_req *batch, int n_req, int n_tok)
{
    struct moe_engine *e = batch->engine;
    const struct moe_model *m = moe_engine_model(e);
    const size_t H = (size_t)m->cfg.hidden, K = (size_t)m->cfg.top_k;
    struct moe_forward_stats st;
    struct moe_error err = {0};
    uint64_t t0 = moe_now_ns();
    float *x = NULL, *out = NULL, *w = NULL, *win = NULL;
    int32_t *ids = NULL, *idin = NULL;
    struct batch_buf bx = {0}, bout = {0};
    size_t row = 0;
    int r;

    if (n_req == 1) {
        /* Alone: straight from and into the request's buffers. */
        r = moe_layer_forward_ex(e, &batch->a, &st, &err);
        goto done;
    }
    x = batch_buf_get(s, &bx, (size_t)n_tok * H * sizeof(*x));
    out = batch_buf_get(s, &bout, (size_t)n_tok * H * sizeof(*out));
    ids = malloc((size_t)n_tok * K * sizeof(*ids));
    w = malloc((size_t)n_tok * K * sizeof(*w));
    if (batch->a.ids) {
        idin = malloc((size_t)n_tok * K * sizeof(*idin));
        win = malloc((size_t)n_tok * K * sizeof(*win));
    }
    if (!x || !out || !ids || !w || (batch->a.ids && (!idin || !win))) {
        r = moe_error_set(&err, -ENOMEM, "out of memory batching %d tokens", n_tok);
        goto done;
    }
    for (struct moe_sched_req *q = batch; q; q = q->next_) {
        memcpy(x + row * H, q->a.x, (size_t)q->a.n_tokens * H * sizeof(*x));
        if (idin) {
            memcpy(idin + row * K, q->a.ids, (size_t)q->a.n_tokens * K * sizeof(*idin));
            memcpy(win + row * K, q->a.weights, (size_t)q->a.n_tokens * K * sizeof(*win));
        }
        row += (size_t)q->a.n_tokens;
    }
    r = moe_layer_forward_ex(e,
                             &(struct moe_layer_args){.layer = batch->a.layer,
                                                      .x = x,
                                                      .n_tokens = n_tok,
                                                      .ids = idin,
                                                      .weights = win,
                                                      .flags = batch->a.flags,
                                                      .out = out,
                                                      .ret_ids = ids,
                                                      .ret_weights = w},
                             &st, &err);
    if (r == -EINVAL) {
        moe_membudget_buf_put(s->mem, bx.p, bx.cap);
        moe_membudget_buf_put(s->mem, bout.p, bout.cap);
        free(ids);
        free(w);
        free(idin);
        free(win);
        run_alone(s, batch, n_req, n_tok, t0);
        return;
    }
    if (r == 0) {
        row = 0;
        for (struct moe_sched_req *q = batch; q; q = q->next_) {
            memcpy(q->a.out, out + row * H, (size_t)q->a.n_tokens * H * sizeof(*out));
            if (q->a.ret_ids)
                memcpy(q->a.ret_ids, ids + row * K, (size_t)q->a.n_tokens * K * sizeof(*ids));
            if (q->a.ret_weights)
                memcpy(q->a.ret_weights, w + row * K, (size_t)q->a.n_tokens * K * sizeof(*w));
            row += (size_t)q->a.n_tokens;
        }
    }
done:
    moe_membudget_buf_put(s->mem, bx.p, bx.cap);
    moe_membudget_buf_put(s->mem, bout.p, bout.cap);
    free(ids);
    free(w);
    free(idin);
    free(win);
    pthread_mutex_lock(&s->lock);
    s->batches++;
    s->batch_requests[hist_bucket(n_req)]++;
    s->batch_tokens[hist_bucket(n_tok)]++;
    s->batch_requests_sum += (uint64_t)n_req;
    s->batch_tokens_sum += (uint64_t)n_tok;
    if (r < 0)
        s->failed += (uint64_t)n_req;
    pthread_mutex_unlock(&s->lock);
    for (struct moe_sched_req *q = batch, *next; q; q = next) {
        next = q->next_;
        q->next_ = NULL;
        if (r == 0)
            q->st = st;
        q->queue_ns = t0 - q->t_submit_;
        q->batch_requests = n_req;
        q->batch_tokens = n_tok;
        finish(q, r, r < 0 ? err.msg : NULL);
    }
}

static void *worker(void *arg)
{
    struct moe_sched *s = arg;

    pthread_mutex_lock(&s->lock);
    for (;;) {
        struct moe_sched_req *first = s->head, *batch;
        uint64_t now = moe_now_ns(), mem;
        int n_req, n_tok;

        if (!first) {
            if (s->quit)
                break;
            if (s->trims_left && !s->running) {
                /* Idle after a burst: give memory back once the idle spell
                 * has lasted trim_idle_ns (a burst that goes on keeps it),
                 * and again at twice, four, eight and sixteen times that. */
                uint64_t due =
                    s->last_progress_ns + (s->cfg.trim_idle_ns << (TRIMS - s->trims_left));

                if (now >= due) {
                    bool settle = s->trims_left < TRIMS, did;

                    s->trims_left--;
                    pthread_mutex_unlock(&s->lock);
                    did = give_back(s, settle);
                    pthread_mutex_lock(&s->lock);
                    if (!did && s->trims_left == TRIMS - 1)
                        s->trims_left = 0; /* not a burst: nothing to settle */
                } else {
                    struct timespec ts = moe_realtime_after_ms((due - now + 999999) / 1000000);

                    pthread_cond_timedwait(&s->cv, &s->lock, &ts);
                }
                continue;
            }
            pthread_cond_wait(&s->cv, &s->lock);
            continue;
        }
        /* A lone caller's request alone in the scheduler runs at once: no
         * one is there to join it (s->lone says none came last time). */
        if (s->lone && !first->next_ && !s->running)
            goto take;
        if (!s->stopping && now - first->t_submit_ < s->cfg.window_ns &&
            key_tokens(s, first) < s->cfg.max_batch_tokens) {
            /* Let others join until the window closes. */
            uint64_t wake = first->t_submit_ + s->cfg.window_ns;
            struct timespec ts;

            clock_gettime(CLOCK_REALTIME, &ts);
            uint64_t abs =
                (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec + (wake - now);
            ts.tv_sec = (time_t)(abs / 1000000000ull);
            ts.tv_nsec = (long)(abs % 1000000000ull);
            pthread_cond_timedwait(&s->cv, &s->lock, &ts);
            continue;
        }
    take:
        if (moe_membudget_acquire(s->mem, first->mem_) < 0) {
            /* Not enough memory until running batches give some back (it
             * fits the limit: submit checked); they signal s->cv. */
            pthread_cond_wait(&s->cv, &s->lock);
            continue;
        }
        batch = take_batch(s, &n_req, &n_tok, &mem);
        /* Waited the whole window (or ran at once) and nobody came: the
         * next lone request need not wait. */
        if (n_req == 1 && batch->idle_ && !s->head && !s->running && !s->stopping &&
            now - batch->t_submit_ >= s->cfg.window_ns)
            s->lone = true;
        s->running += n_req;
        /* Another worker may take the next key meanwhile. */
        if (s->head)
            pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->lock);
        run_batch(s, batch, n_req, n_tok);
        pthread_mutex_lock(&s->lock);
        moe_membudget_release(s->mem, mem);
        /* Memory given back: a batch waiting for it may fit now. */
        if (s->head)
            pthread_cond_broadcast(&s->cv);
        s->trims_left = TRIMS;
        s->running -= n_req;
        s->completed += (uint64_t)n_req;
        s->last_progress_ns = moe_now_ns();
        if (!s->head && !s->running)
            pthread_cond_broadcast(&s->idle_cv);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

int moe_sched_create(const struct moe_sched_config *cfg, struct moe_sched **ret,
                     struct moe_error *err)
{
    struct moe_sched *s = calloc(1, sizeof(*s));
    int r;

    if (!s)
        return moe_error_set(err, -ENOMEM, "out of memory");
    if (cfg)
        s->cfg = *cfg;
    if (s->cfg.n_workers <= 0)
        s->cfg.n_workers = 2;
    if (s->cfg.window_ns == 0)
        s->cfg.window_ns = 200000;
    if (s->cfg.max_batch_tokens <= 0)
        s->cfg.max_batch_tokens = 4096;
    if (s->cfg.trim_idle_ns == 0)
        s->cfg.trim_idle_ns = 1000000000ull;
    if (s->cfg.n_workers > 256 || s->cfg.max_batch_tokens > MOE_MAX_TOKENS) {
        free(s);
        return moe_error_set(err, -EINVAL,
                             "scheduler: %d workers, batches of %d tokens: expected at most 256 "
                             "and %d",
                             cfg->n_workers, cfg->max_batch_tokens, MOE_MAX_TOKENS);
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_cond_init(&s->idle_cv, NULL);
    r = moe_membudget_create(
        &(struct moe_membudget_config){.limit = s->cfg.mem_limit, .trim_bytes = s->cfg.trim_bytes},
        &s->mem, err);
    if (r < 0) {
        moe_sched_free(s);
        return r;
    }
    s->threads = calloc((size_t)s->cfg.n_workers, sizeof(*s->threads));
    if (!s->threads) {
        moe_sched_free(s);
        return moe_error_set(err, -ENOMEM, "out of memory");
    }
    for (int i = 0; i < s->cfg.n_workers; i++) {
        r = pthread_create(&s->threads[i], NULL, worker, s);
        if (r) {
            moe_sched_free(s);
            return moe_error_set(err, -r, "scheduler: cannot start a worker: %s", strerror(r));
        }
        s->n_threads++;
    }
    *ret = s;
    return 0;
}

void moe_sched_stop(struct moe_sched *s)
{
    pthread_mutex_lock(&s->lock);
    s->stopping = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->lock);
}

void moe_sched_free(struct moe_sched *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->lock);
    s->stopping = true;
    s->quit = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < s->n_threads; i++)
        pthread_join(s->threads[i], NULL);
    pthread_cond_destroy(&s->cv);
    pthread_cond_destroy(&s->idle_cv);
    pthread_mutex_destroy(&s->lock);
    moe_membudget_free(s->mem);
    free(s->threads);
    free(s);
}

int moe_sched_submit(struct moe_sched *s, struct moe_sched_req *r, struct moe_error *err)
{
    uint64_t limit;

    if (!r->engine || !r->a.x || !r->a.out || !r->done || r->a.n_tokens < 1 ||
        r->a.n_tokens > MOE_MAX_TOKENS || !r->a.ids != !r->a.weights)
        return moe_error_set(err, -EINVAL, "malformed forward request");
    r->next_ = NULL;
    r->t_submit_ = moe_now_ns();
    r->mem_ = moe_sched_request_bytes(moe_engine_model(r->engine), r->a.n_tokens);
    r->held_ = held_bytes(moe_engine_model(r->engine), r->a.n_tokens);
    limit = moe_membudget_limit(s->mem);
    if (!moe_membudget_fits(s->mem, r->mem_)) {
        uint64_t per = moe_sched_request_bytes(moe_engine_model(r->engine), 1);

        pthread_mutex_lock(&s->lock);
        s->mem_refused++;
        pthread_mutex_unlock(&s->lock);
        return moe_error_set(err, -ENOSPC,
                             "a request of %d tokens needs about %" PRIu64
                             " MiB of memory to compute, more than request_memory_bytes "
                             "allows requests in flight (%" PRIu64 " MiB): send at most %" PRIu64
                             " tokens per request, or raise request_memory_bytes",
                             r->a.n_tokens, MIB(r->mem_), MIB(limit), limit / per);
    }
    pthread_mutex_lock(&s->lock);
    if (s->stopping) {
        pthread_mutex_unlock(&s->lock);
        return moe_error_set(err, -ESHUTDOWN, "moed is shutting down: no new requests");
    }
    /* The requests waiting for memory hold their buffers: as much again as
     * the limit at most. */
    if (limit && s->pending && s->mem_pending + r->held_ > limit) {
        uint64_t queued = s->mem_pending;

        s->mem_refused++;
        pthread_mutex_unlock(&s->lock);
        return moe_error_set(err, -ENOSPC,
                             "moed is at its memory budget for requests: %" PRIu64
                             " MiB queued behind those running, and this request needs %" PRIu64
                             " MiB more (request_memory_bytes %" PRIu64
                             " MiB): retry later, or raise request_memory_bytes",
                             MIB(queued), MIB(r->held_), MIB(limit));
    }
    /* Idle until now: the time without progress counts from here. */
    r->idle_ = !s->pending && !s->running;
    if (r->idle_)
        s->last_progress_ns = r->t_submit_;
    else
        s->lone = false; /* company: batch again */
    if (s->tail)
        s->tail->next_ = r;
    else
        s->head = r;
    s->tail = r;
    s->pending++;
    s->mem_pending += r->held_;
    s->requests++;
    s->tokens += (uint64_t)r->a.n_tokens;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int moe_sched_drain(struct moe_sched *s, uint64_t timeout_ms)
{
    struct timespec ts;
    uint64_t before;
    int r = 0;

    ts = moe_realtime_after_ms(timeout_ms);
    pthread_mutex_lock(&s->lock);
    before = s->completed;
    /* Drain now: no more waiting for windows. */
    pthread_cond_broadcast(&s->cv);
    while (s->head || s->running) {
        if (!timeout_ms) {
            pthread_cond_wait(&s->idle_cv, &s->lock);
        } else if (pthread_cond_timedwait(&s->idle_cv, &s->lock, &ts) == ETIMEDOUT) {
            r = -ETIMEDOUT;
            break;
        }
    }
    if (r == 0)
        r = (int)MOE_MIN(s->completed - before, (uint64_t)INT32_MAX);
    pthread_mutex_unlock(&s->lock);
    return r;
}

void moe_sched_get_stats(struct moe_sched *s, struct moe_sched_stats *ret)
{
    struct moe_membudget_stats ms;

    pthread_mutex_lock(&s->lock);
    ret->requests = s->requests;
    ret->tokens = s->tokens;
    ret->batches = s->batches;
    ret->failed = s->failed;
    memcpy(ret->batch_requests, s->batch_requests, sizeof(ret->batch_requests));
    memcpy(ret->batch_tokens, s->batch_tokens, sizeof(ret->batch_tokens));
    ret->batch_requests_sum = s->batch_requests_sum;
    ret->batch_tokens_sum = s->batch_tokens_sum;
    ret->pending = s->pending;
    ret->running = s->running;
    ret->completed = s->completed;
    ret->last_progress_ns = s->last_progress_ns;
    ret->mem_pending = s->mem_pending;
    ret->mem_refused = s->mem_refused;
    pthread_mutex_unlock(&s->lock);
    moe_membudget_get_stats(s->mem, &ms);
    ret->mem_limit = ms.limit;
    ret->mem_used = ms.used;
    ret->mem_peak = ms.peak;
    ret->mem_waits = ms.waits;
    ret->mem_trims = ms.trims;
}
