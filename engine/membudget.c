/*
 * The memory budget and buffer pool (membudget.h).
 *
 * Owns: the counters and the pool (at most POOL_SLOTS buffers, pooled bytes
 * at most cfg.pool_bytes).  Lock: b->lock guards everything; it is a leaf
 * (callers may hold theirs, nothing is called with it held but free() of
 * nothing: buffers leave the pool before they are freed).
 */
#include "membudget.h"

#include <assert.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define POOL_SLOTS 16
#define DEFAULT_POOL (64ull << 20)
#define DEFAULT_TRIM (64ull << 20)

struct pooled {
    void *p;    /* moe_alloc_aligned */
    size_t cap; /* its size */
};

struct moe_membudget {
    struct moe_membudget_config cfg;
    pthread_mutex_t lock;
    uint64_t used;       /* charged now */
    uint64_t since_trim; /* charged in all since the last trim */
    struct pooled pool[POOL_SLOTS];
    int n_pool;
    struct moe_membudget_stats st; /* peak, waits, refused, pooled, pool_hits, trims */
};

int moe_membudget_create(const struct moe_membudget_config *cfg, struct moe_membudget **ret,
                         struct moe_error *err)
{
    struct moe_membudget *b = calloc(1, sizeof(*b));

    if (!b)
        return moe_error_set(err, -ENOMEM, "out of memory");
    if (cfg)
        b->cfg = *cfg;
    if (!b->cfg.pool_bytes)
        b->cfg.pool_bytes = DEFAULT_POOL;
    if (!b->cfg.trim_bytes)
        b->cfg.trim_bytes = DEFAULT_TRIM;
    pthread_mutex_init(&b->lock, NULL);
    *ret = b;
    return 0;
}

void moe_membudget_free(struct moe_membudget *b)
{
    if (!b)
        return;
    for (int i = 0; i < b->n_pool; i++)
        moe_free_aligned(b->pool[i].p);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

bool moe_membudget_fits(const struct moe_membudget *b, uint64_t bytes)
{
    return !b->cfg.limit || bytes <= b->cfg.limit;
}

uint64_t moe_membudget_limit(const struct moe_membudget *b)
{
    return b->cfg.limit;
}

int moe_membudget_acquire(struct moe_membudget *b, uint64_t bytes)
{
    int r = 0;

    pthread_mutex_lock(&b->lock);
    if (!moe_membudget_fits(b, bytes)) {
        b->st.refused++;
        r = -ENOSPC;
    } else if (b->cfg.limit && bytes > b->cfg.limit - b->used) {
        b->st.waits++;
        r = -EAGAIN;
    } else {
        b->used += bytes;
        b->since_trim += bytes;
        if (b->used > b->st.peak)
            b->st.peak = b->used;
    }
    pthread_mutex_unlock(&b->lock);
    return r;
}

void moe_membudget_release(struct moe_membudget *b, uint64_t bytes)
{
    pthread_mutex_lock(&b->lock);
    assert(bytes <= b->used);
    b->used -= bytes;
    pthread_mutex_unlock(&b->lock);
}

void *moe_membudget_buf_get(struct moe_membudget *b, size_t bytes, size_t *ret_cap)
{
    int best = -1;
    void *p;

    if (bytes > SIZE_MAX - 63)
        return NULL;
    bytes = (bytes + 63) & ~(size_t)63;
    pthread_mutex_lock(&b->lock);
    /* The smallest pooled buffer that is large enough, and not more than
     * twice as large (a small request does not pin a large buffer). */
    for (int i = 0; i < b->n_pool; i++)
        if (b->pool[i].cap >= bytes && b->pool[i].cap / 2 <= bytes &&
            (best < 0 || b->pool[i].cap < b->pool[best].cap))
            best = i;
    if (best >= 0) {
        p = b->pool[best].p;
        *ret_cap = b->pool[best].cap;
        b->st.pooled -= b->pool[best].cap;
        b->pool[best] = b->pool[--b->n_pool];
        b->st.pool_hits++;
        pthread_mutex_unlock(&b->lock);
        return p;
    }
    pthread_mutex_unlock(&b->lock);
    p = moe_alloc_aligned(bytes);
    if (p)
        *ret_cap = bytes;
    return p;
}

void moe_membudget_buf_put(struct moe_membudget *b, void *p, size_t cap)
{
    if (!p)
        return;
    pthread_mutex_lock(&b->lock);
    if (b->n_pool < POOL_SLOTS && b->st.pooled + cap <= b->cfg.pool_bytes) {
        b->pool[b->n_pool++] = (struct pooled){.p = p, .cap = cap};
        b->st.pooled += cap;
        p = NULL;
    }
    pthread_mutex_unlock(&b->lock);
    moe_free_aligned(p);
}

bool moe_membudget_trim_due(struct moe_membudget *b)
{
    bool due;

    pthread_mutex_lock(&b->lock);
    due = b->since_trim >= b->cfg.trim_bytes;
    pthread_mutex_unlock(&b->lock);
    return due;
}

void moe_membudget_trim(struct moe_membudget *b)
{
    struct pooled out[POOL_SLOTS];
    int n;

    pthread_mutex_lock(&b->lock);
    n = b->n_pool;
    memcpy(out, b->pool, (size_t)n * sizeof(*out));
    b->n_pool = 0;
    b->st.pooled = 0;
    b->since_trim = 0;
    b->st.trims++;
    pthread_mutex_unlock(&b->lock);
    for (int i = 0; i < n; i++)
        moe_free_aligned(out[i].p);
    /* Returns the top of the main heap and madvises free pages of every
     * arena away (glibc 2.8 and later): what large requests left behind. */
    malloc_trim(0);
}

void moe_membudget_get_stats(struct moe_membudget *b, struct moe_membudget_stats *ret)
{
    pthread_mutex_lock(&b->lock);
    *ret = b->st;
    ret->limit = b->cfg.limit;
    ret->used = b->used;
    pthread_mutex_unlock(&b->lock);
}
