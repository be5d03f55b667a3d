/*
 * The host-memory tier and the first-fit allocator behind it (tier.h).
 *
 * The tier reserves address space for the largest capacity it may be given
 * (the capacity at creation or the machine's memory, whichever is larger),
 * PROT_NONE beyond the current capacity, and maps pages read-write as the
 * capacity grows.  Lowering the capacity stops allocations beyond the new
 * end; blocks already there are returned to the kernel (MADV_DONTNEED) as
 * the cache evicts them.
 */
#include "tier.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- arena ------------------------------------------------------------------------------ */

int moe_arena_init(struct moe_arena *a, uint64_t size)
{
    memset(a, 0, sizeof(*a));
    a->size = size;
    a->limit = size;
    if (size == 0)
        return 0;
    a->cap = 16;
    a->free = malloc(a->cap * sizeof(*a->free));
    if (!a->free)
        return -ENOMEM;
    a->free[0] = (struct moe_arena_extent){0, size};
    a->n = 1;
    return 0;
}

void moe_arena_clear(struct moe_arena *a)
{
    free(a->free);
    memset(a, 0, sizeof(*a));
}

int moe_arena_alloc(struct moe_arena *a, uint64_t len, uint64_t *ret)
{
    if (len == 0)
        return -EINVAL;
    for (size_t i = 0; i < a->n; i++) {
        struct moe_arena_extent *x = &a->free[i];

        if (x->len < len || x->off + len > a->limit)
            continue;
        *ret = x->off;
        x->off += len;
        x->len -= len;
        if (x->len == 0) {
            memmove(x, x + 1, (a->n - i - 1) * sizeof(*x));
            a->n--;
        }
        a->used += len;
        return 0;
    }
    return -ENOSPC;
}

static int arena_insert(struct moe_arena *a, size_t at, uint64_t off, uint64_t len)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 16;
        struct moe_arena_extent *f = realloc(a->free, cap * sizeof(*f));

        if (!f)
            return -ENOMEM;
        a->free = f;
        a->cap = cap;
    }
    memmove(&a->free[at + 1], &a->free[at], (a->n - at) * sizeof(*a->free));
    a->free[at] = (struct moe_arena_extent){off, len};
    a->n++;
    return 0;
}

void moe_arena_free(struct moe_arena *a, uint64_t off, uint64_t len)
{
    size_t lo = 0, hi = a->n;

    /* first extent after off */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;

        if (a->free[mid].off < off)
            lo = mid + 1;
        else
            hi = mid;
    }
    a->used -= len;
    if (lo > 0 && a->free[lo - 1].off + a->free[lo - 1].len == off) {
        a->free[lo - 1].len += len;
        if (lo < a->n && a->free[lo - 1].off + a->free[lo - 1].len == a->free[lo].off) {
            a->free[lo - 1].len += a->free[lo].len;
            memmove(&a->free[lo], &a->free[lo + 1], (a->n - lo - 1) * sizeof(*a->free));
            a->n--;
        }
        return;
    }
    if (lo < a->n && off + len == a->free[lo].off) {
        a->free[lo].off = off;
        a->free[lo].len += len;
        return;
    }
    if (arena_insert(a, lo, off, len) < 0) {
        /* Out of memory for the free list: the block is lost to this arena
         * (its bytes stay counted as used), never handed out twice. */
        a->used += len;
    }
}

int moe_arena_resize(struct moe_arena *a, uint64_t new_size)
{
    if (new_size > a->size) {
        uint64_t old = a->size;

        /* Extend the last extent if it ends at the old size. */
        if (a->n && a->free[a->n - 1].off + a->free[a->n - 1].len == old) {
            a->free[a->n - 1].len += new_size - old;
        } else {
            int r = arena_insert(a, a->n, old, new_size - old);

            if (r < 0)
                return r;
        }
        a->size = new_size;
    }
    /* Shrinking only lowers the ceiling for new blocks: blocks beyond it
     * stay valid until freed, and the free list keeps covering the range. */
    a->limit = new_size;
    return 0;
}

/* ---- host tier ---------------------------------------------------------------------------- */

struct host_tier {
    struct moe_tier t;
    struct moe_arena arena;
    uint8_t *base;     /* reserved range, span bytes */
    uint64_t span;     /* reserved */
    uint64_t mapped;   /* [0, mapped) is read-write */
    uint64_t sim_next; /* simulation: fake addresses */
    bool simulate;
};

static struct host_tier *host_of(struct moe_tier *t)
{
    return t->priv;
}

static uint64_t round_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

static void *host_alloc(struct moe_tier *t, uint64_t bytes)
{
    struct host_tier *h = host_of(t);
    uint64_t off;

    if (moe_arena_alloc(&h->arena, round_up(bytes, MOE_TIER_ALIGN), &off) < 0)
        return NULL;
    if (h->simulate)
        return (void *)(uintptr_t)(MOE_TIER_ALIGN + off);
    return h->base + off;
}

static void host_free(struct moe_tier *t, void *p, uint64_t bytes)
{
    struct host_tier *h = host_of(t);
    uint64_t len = round_up(bytes, MOE_TIER_ALIGN), off;

    if (!p)
        return;
    off =
        h->simulate ? (uint64_t)(uintptr_t)p - MOE_TIER_ALIGN : (uint64_t)((uint8_t *)p - h->base);
    if (!h->simulate && off + len > h->arena.limit) {
        /* Beyond a lowered capacity: give those pages back to the kernel. */
        uint64_t from = MOE_MAX(off, h->arena.limit);

        madvise(h->base + from, off + len - from, MADV_DONTNEED);
    }
    moe_arena_free(&h->arena, off, len);
}

static int host_resize(struct moe_tier *t, uint64_t capacity)
{
    struct host_tier *h = host_of(t);
    uint64_t want = round_up(capacity, MOE_TIER_ALIGN);
    int r;

    if (want > h->span)
        return -ENOSPC;
    if (!h->simulate && want > h->mapped) {
        if (mprotect(h->base + h->mapped, want - h->mapped, PROT_READ | PROT_WRITE) < 0)
            return -errno;
        madvise(h->base + h->mapped, want - h->mapped, MADV_HUGEPAGE);
        h->mapped = want;
    }
    r = moe_arena_resize(&h->arena, want);
    if (r < 0)
        return r;
    t->capacity = capacity;
    return 0;
}

static void host_destroy(struct moe_tier *t)
{
    struct host_tier *h = host_of(t);

    if (h->base)
        munmap(h->base, h->span);
    moe_arena_clear(&h->arena);
    free(h);
}

static const struct moe_tier_ops host_ops = {
    .kind = "host",
    .alloc = host_alloc,
    .free = host_free,
    .upload = NULL,
    .resize = host_resize,
    .destroy = host_destroy,
};

int moe_tier_host_create(const char *name, uint64_t capacity, bool simulate, struct moe_tier **ret,
                         struct moe_error *err)
{
    struct host_tier *h = calloc(1, sizeof(*h));
    uint64_t want = round_up(capacity, MOE_TIER_ALIGN), span;
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    int r;

    if (!h)
        return moe_error_set(err, -ENOMEM, "out of memory");
    if (capacity == 0) {
        free(h);
        return moe_error_set(err, -EINVAL, "tier %s: a capacity of 0 bytes holds no expert", name);
    }
    /* Room to grow up to the machine's memory without moving blocks. */
    span = want;
    if (pages > 0 && psz > 0 && (uint64_t)pages * (uint64_t)psz > span)
        span = round_up((uint64_t)pages * (uint64_t)psz, MOE_TIER_ALIGN);
    if (simulate)
        span = UINT64_MAX / 4;
    h->simulate = simulate;
    h->span = span;
    if (!simulate) {
        h->base = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (h->base == MAP_FAILED) {
            r = -errno;
            free(h);
            return moe_error_set(err, r, "tier %s: cannot reserve %llu bytes of address space: %s",
                                 name, (unsigned long long)span, strerror(-r));
        }
        if (mprotect(h->base, want, PROT_READ | PROT_WRITE) < 0) {
            r = -errno;
            munmap(h->base, span);
            free(h);
            return moe_error_set(err, r, "tier %s: cannot map %llu bytes: %s", name,
                                 (unsigned long long)want, strerror(-r));
        }
        madvise(h->base, want, MADV_HUGEPAGE);
        h->mapped = want;
    }
    r = moe_arena_init(&h->arena, want);
    if (r < 0) {
        if (h->base)
            munmap(h->base, span);
        free(h);
        return moe_error_set(err, r, "out of memory");
    }
    h->t.ops = &host_ops;
    h->t.priv = h;
    snprintf(h->t.name, sizeof(h->t.name), "%s", name);
    h->t.capacity = capacity;
    h->t.host_memory = !simulate;
    h->t.base = h->base;
    h->t.span = simulate ? 0 : want;
    *ret = &h->t;
    return 0;
}
