/*
 * A memory budget for requests in flight, and a bounded pool of buffers.
 *
 * The scheduler (scheduler.h) charges each batch it runs the bytes its
 * requests are estimated to use (moe_engine_request_bytes: the request's
 * own buffers, the batch's and the forward's scratch) and gives them back
 * when the batch is done; a batch that does not fit waits, queued, until
 * running ones give enough back.  A request larger than the whole budget
 * can never run and is refused at once (-ENOSPC, RESOURCE_EXHAUSTED in
 * moed).  One budget serves every transport, since they all go through the
 * scheduler.
 *
 * Buffers: moe_membudget_buf_get hands out a buffer from the pool when one
 * of the right size is there (a freed buffer at least as large as asked and
 * at most twice that), else from malloc; moe_membudget_buf_put keeps it for
 * reuse while the pool holds less than pool_bytes, else frees it.
 * moe_membudget_free frees what the pool holds.
 *
 * Giving memory back: moe_membudget_trim empties the pool and asks the
 * allocator to return its free memory to the kernel (glibc's malloc_trim,
 * which also madvises free pages away in every arena).  The scheduler
 * calls it when it goes idle after a burst (bytes charged since the last
 * trim above trim_bytes), so that RSS comes back down after large requests.
 *
 * Thread safety: every function may be called from any thread; one mutex
 * inside (a leaf: nothing else is locked while it is held).
 */
#ifndef MOED_ENGINE_MEMBUDGET_H
#define MOED_ENGINE_MEMBUDGET_H

#include "common.h"

#include <stddef.h>
#include <stdint.h>

struct moe_membudget;

struct moe_membudget_config {
    uint64_t limit;      /* bytes that requests in flight may use; 0: no limit */
    uint64_t pool_bytes; /* freed buffers kept for reuse, in all; 0: 64 MiB */
    uint64_t trim_bytes; /* trim when idle after this many bytes charged; 0: 64 MiB */
};

struct moe_membudget_stats {
    uint64_t limit;     /* 0: none */
    uint64_t used;      /* charged now */
    uint64_t peak;      /* most charged at once */
    uint64_t waits;     /* acquires answered -EAGAIN (a batch queued for memory) */
    uint64_t refused;   /* acquires answered -ENOSPC (larger than the limit) */
    uint64_t pooled;    /* bytes in the pool now */
    uint64_t pool_hits; /* buffers handed out from the pool */
    uint64_t trims;     /* moe_membudget_trim calls that gave memory back */
};

/* 0 and *ret, or -ENOMEM / -EINVAL with err. */
int moe_membudget_create(const struct moe_membudget_config *cfg, struct moe_membudget **ret,
                         struct moe_error *err);
/* Frees the pool and the budget; nothing may be charged.  NULL is a no-op. */
void moe_membudget_free(struct moe_membudget *b);

/*
 * Charges bytes: 0 when they fit now; -EAGAIN when they fit once charges
 * now held are released (the caller queues and tries again after a
 * release); -ENOSPC when they exceed the limit itself (never fit).
 */
int moe_membudget_acquire(struct moe_membudget *b, uint64_t bytes);
/* Gives back bytes from a successful acquire. */
void moe_membudget_release(struct moe_membudget *b, uint64_t bytes);
/* Whether bytes could ever be charged (at most the limit). */
bool moe_membudget_fits(const struct moe_membudget *b, uint64_t bytes);
uint64_t moe_membudget_limit(const struct moe_membudget *b);

/*
 * A buffer of at least bytes (64-byte aligned), from the pool or newly
 * allocated; *ret_cap is its real size, to give to buf_put.  NULL when out
 * of memory.  The contents are undefined.
 */
void *moe_membudget_buf_get(struct moe_membudget *b, size_t bytes, size_t *ret_cap);
/* Returns a buffer from buf_get (cap as it said); NULL is a no-op. */
void moe_membudget_buf_put(struct moe_membudget *b, void *p, size_t cap);

/* Whether at least trim_bytes were charged since the last trim (a burst). */
bool moe_membudget_trim_due(struct moe_membudget *b);
/* Empties the pool and returns the heap's free memory to the kernel. */
void moe_membudget_trim(struct moe_membudget *b);

void moe_membudget_get_stats(struct moe_membudget *b, struct moe_membudget_stats *ret);

#endif
