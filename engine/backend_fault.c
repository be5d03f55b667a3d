/*
 * The fault-injecting backend (moe_backend_faults_wrap, backend.h): a
 * struct moe_backend in front of another that loses its device on the Nth
 * call of a kind, as a sticky CUDA error does, so that the engine's and the
 * daemon's handling of a lost device can be tested without a GPU.
 *
 * Owns the inner backend and a copy of its ops table with the slots
 * replaced (same name and host_memory).  Counters and the lost flag are
 * atomics: backend calls come from any thread.  why is written once, by
 * the call that loses the device, before lost is set (release); readers
 * load lost (acquire) before reading why.
 */
#include "backend.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

struct fault_backend {
    struct moe_backend self; /* first: the engine's handle */
    struct moe_backend_ops ops;
    struct moe_backend *inner;
    struct moe_backend_faults f;
    _Atomic uint64_t n_ffn, n_matmul, n_copy; /* calls so far, of each kind */
    _Atomic bool lost;   /* release in lose(), acquire in fb_lost() and is_lost() */
    _Atomic bool losing; /* the one call that writes why */
    char why[160];
};

static struct fault_backend *fb_of(struct moe_backend *b)
{
    return (struct fault_backend *)b;
}

static bool is_lost(struct fault_backend *fb)
{
    return atomic_load_explicit(&fb->lost, memory_order_acquire);
}

/* Counts a call on counter n; -ENOTRECOVERABLE when the device is lost or
 * this is the call that loses it (nth), else 0. */
static int fb_count(struct fault_backend *fb, _Atomic uint64_t *n, uint64_t nth, const char *kind)
{
    /* Relaxed: the count only picks the call; lost orders why. */
    uint64_t k = atomic_fetch_add_explicit(n, 1, memory_order_relaxed) + 1;

    if (is_lost(fb))
        return -ENOTRECOVERABLE;
    if (nth == 0 || k != nth)
        return 0;
    if (!atomic_exchange_explicit(&fb->losing, true, memory_order_relaxed)) {
        snprintf(fb->why, sizeof(fb->why),
                 "device lost: injected fault on %s call %llu (MOED_BACKEND_FAULTS, a test hook)",
                 kind, (unsigned long long)k);
        /* Release: publishes why; pairs with the acquire in is_lost(). */
        atomic_store_explicit(&fb->lost, true, memory_order_release);
    }
    return -ENOTRECOVERABLE;
}

static void fb_free(struct moe_backend *b)
{
    struct fault_backend *fb = fb_of(b);

    moe_backend_free(fb->inner);
    free(fb);
}

static void *fb_alloc(struct moe_backend *b, size_t bytes)
{
    struct fault_backend *fb = fb_of(b);

    return is_lost(fb) ? NULL : fb->inner->ops->alloc(fb->inner, bytes);
}

static void fb_mem_free(struct moe_backend *b, void *p)
{
    struct fault_backend *fb = fb_of(b);

    fb->inner->ops->mem_free(fb->inner, p);
}

static int fb_copy_in(struct moe_backend *b, void *dst, const void *src, size_t bytes)
{
    struct fault_backend *fb = fb_of(b);
    int r = fb_count(fb, &fb->n_copy, fb->f.copy_nth, "copy");

    return r < 0 ? r : fb->inner->ops->copy_in(fb->inner, dst, src, bytes);
}

static int fb_copy_out(struct moe_backend *b, void *dst, const void *src, size_t bytes)
{
    struct fault_backend *fb = fb_of(b);
    int r = fb_count(fb, &fb->n_copy, fb->f.copy_nth, "copy");

    return r < 0 ? r : fb->inner->ops->copy_out(fb->inner, dst, src, bytes);
}

static int fb_matmul(struct moe_backend *b, const void *w, enum moe_dtype dtype, int64_t rows,
                     int64_t cols, const float *x, int n_tokens, float *y)
{
    struct fault_backend *fb = fb_of(b);
    int r = fb_count(fb, &fb->n_matmul, fb->f.matmul_nth, "matmul");

    return r < 0 ? r : fb->inner->ops->matmul(fb->inner, w, dtype, rows, cols, x, n_tokens, y);
}

static int fb_grouped_ffn(struct moe_backend *b, const float *x, int64_t hidden, int n_tokens,
                          const struct moe_ffn_work *work, int n_work, float *out)
{
    struct fault_backend *fb = fb_of(b);
    int r = fb_count(fb, &fb->n_ffn, fb->f.ffn_nth, "grouped_ffn");

    return r < 0 ? r
                 : fb->inner->ops->grouped_ffn(fb->inner, x, hidden, n_tokens, work, n_work, out);
}

static void fb_trim(struct moe_backend *b)
{
    struct fault_backend *fb = fb_of(b);

    fb->inner->ops->trim(fb->inner);
}

static const char *fb_lost(struct moe_backend *b)
{
    struct fault_backend *fb = fb_of(b);

    /* The inner backend's own loss first (a real device error). */
    const char *in = moe_backend_lost(fb->inner);

    return in ? in : is_lost(fb) ? fb->why : NULL;
}

int moe_backend_faults_wrap(struct moe_backend *inner, const struct moe_backend_faults *f,
                            struct moe_backend **ret, struct moe_error *err)
{
    struct fault_backend *fb = calloc(1, sizeof(*fb));

    if (!fb) {
        moe_backend_free(inner);
        return moe_error_set(err, -ENOMEM, "out of memory");
    }
    fb->inner = inner;
    fb->f = *f;
    fb->ops = *inner->ops;
    fb->ops.free = fb_free;
    fb->ops.alloc = fb_alloc;
    fb->ops.mem_free = fb_mem_free;
    fb->ops.copy_in = fb_copy_in;
    fb->ops.copy_out = fb_copy_out;
    fb->ops.matmul = fb_matmul;
    fb->ops.grouped_ffn = fb_grouped_ffn;
    fb->ops.trim = inner->ops->trim ? fb_trim : NULL;
    fb->ops.lost = fb_lost;
    fb->self.ops = &fb->ops;
    fb->self.priv = fb;
    *ret = &fb->self;
    return 0;
}
