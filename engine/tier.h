/*
 * Cache tiers: where resident experts live.  The cache (cache.h) keeps a
 * list of tiers, nearest to compute first, and reaches each only through
 * struct moe_tier_ops, so that a GPU tier (kernels/, one per device) slots
 * in beside the host tier without any change to the cache or its policies.
 *
 * A tier hands out blocks of its memory; the cache decides what lives there
 * and accounts capacity (struct moe_tier.capacity).  The last tier of a
 * cache must hold host memory (host_memory = true): the pager reads into it.
 * Other tiers are filled from it with upload.
 *
 * The host tier reserves its capacity of address space up front
 * (MAP_NORESERVE, transparent huge pages where offered) and touches pages
 * only as experts arrive; blocks come from a first-fit allocator over that
 * range (struct moe_arena), MOE_TIER_ALIGN-aligned, so that O_DIRECT reads
 * go straight into them.
 */
#ifndef MOED_ENGINE_TIER_H
#define MOED_ENGINE_TIER_H

#include "common.h"

#define MOE_TIER_ALIGN 4096u

struct moe_tier;

struct moe_tier_ops {
    const char *kind; /* "host", "cuda" */
    /* A block of bytes (a multiple of MOE_TIER_ALIGN), or NULL when no
     * contiguous room is left (the cache evicts and tries again). */
    void *(*alloc)(struct moe_tier *t, uint64_t bytes);
    void (*free)(struct moe_tier *t, void *p, uint64_t bytes);
    /* Copies bytes from host memory into a block of this tier.  0 or -errno
     * (-ENOTRECOVERABLE: the device is lost, as for a backend, backend.h).
     * NULL for host-memory tiers (the cache then uses memcpy). */
    int (*upload)(struct moe_tier *t, void *dst, const void *src, uint64_t bytes);
    /* Grows or shrinks the memory behind the tier to capacity bytes; blocks
     * in use stay where they are.  0 or -errno (-ENOSPC: blocks in use lie
     * beyond the new end). */
    int (*resize)(struct moe_tier *t, uint64_t capacity);
    void (*destroy)(struct moe_tier *t);
};

struct moe_tier {
    const struct moe_tier_ops *ops;
    void *priv;
    char name[32];     /* "host", "cuda:0" */
    uint64_t capacity; /* bytes the cache may keep here */
    bool host_memory;  /* the CPU (and the pager) can read and write its blocks */
    /* The memory range behind the tier, for registering with the pager
     * (base NULL when it has none, e.g. simulation). */
    void *base;
    uint64_t span;
};

/* Host-memory tier of capacity bytes.  simulate: no memory at all (alloc
 * returns distinct fake addresses that must not be touched). */
int moe_tier_host_create(const char *name, uint64_t capacity, bool simulate, struct moe_tier **ret,
                         struct moe_error *err);

static inline void moe_tier_destroy(struct moe_tier *t)
{
    if (t)
        t->ops->destroy(t);
}

/* ---- first-fit allocator over [0, size) ------------------------------------------------ */

struct moe_arena_extent {
    uint64_t off, len;
};

/* Free extents sorted by offset, never adjacent (merged on free).  New
 * blocks end at or below limit (<= size). */
struct moe_arena {
    uint64_t size;
    uint64_t limit;
    uint64_t used;
    size_t n, cap;
    struct moe_arena_extent *free;
};

int moe_arena_init(struct moe_arena *a, uint64_t size);
void moe_arena_clear(struct moe_arena *a);
/* Offset of a block of len bytes (first fit), or -ENOSPC / -ENOMEM. */
int moe_arena_alloc(struct moe_arena *a, uint64_t len, uint64_t *ret);
void moe_arena_free(struct moe_arena *a, uint64_t off, uint64_t len);
/* Growing adds free space at the end; shrinking lowers the limit for new
 * blocks (blocks beyond it stay valid until freed). */
int moe_arena_resize(struct moe_arena *a, uint64_t new_size);

#endif
