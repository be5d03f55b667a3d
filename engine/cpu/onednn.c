/*
 * The CPU backend's oneDNN GEMMs (onednn.h): oneDNN's matmul primitive
 * through its C API, one primitive per shape kept here (oneDNN compiles
 * each), single-threaded per call in moed's pool threads.
 *
 * Weights stay as moed stores them: a block of n rows of W (n x k bf16,
 * row-major) is the matmul's k x n weights with strides {1, k}.  oneDNN's
 * bf16 kernels (brgemm: AVX-512 BF16, AMX) repack the block into their
 * blocked layout inside every call, as torch's bf16 linear does; where a
 * oneDNN build has no kernel for such transposed weights, the block is
 * transposed here into plain k x n rows first.  Without a bf16 matmul (AVX2
 * machines: oneDNN 2.6 has none there) the block is widened to fp32 and an
 * fp32 matmul runs on fp32 copies of the bf16 activations: the same exact
 * products and fp32 sums, only slower.
 *
 * Scratch: each primitive's scratchpad is user-provided (one buffer per
 * pool thread, grown by moe_onednn_prepare), so concurrent calls on
 * different threads share nothing but the read-only primitives.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <oneapi/dnnl/dnnl.h>

#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#elif DNNL_CPU_RUNTIME != DNNL_RUNTIME_SEQ
#error "the oneDNN path supports oneDNN's OpenMP and sequential CPU runtimes only"
#endif

#include "common.h"
#include "dtype.h"
#include "onednn.h"

/* Primitives kept across calls before moe_onednn_begin forgets them all. */
#define KEEP_PRIMS 512

struct prim {
    int64_t m, n, k;
    dnnl_primitive_t p;
    dnnl_memory_desc_t src, wei, dst, pad;
    size_t pad_bytes;
};

struct thread_buf {
    dnnl_stream_t stream;
    void *pad; /* scratchpad */
    size_t pad_size;
    void *w; /* the weight block widened to fp32 or transposed */
    size_t w_size;
};

struct moe_onednn {
    dnnl_engine_t eng;
    bool bf16;       /* activations and weights bf16 (else fp32) */
    bool transposed; /* weights passed as {1, k} strides (else copied to k x n) */
    bool fast;
    bool amx;
    char describe[160];
    struct prim *prims;
    int n_prims, cap_prims;
    int n_threads;
    struct thread_buf *tb; /* [n_threads] */
};

/* Runs with the calling thread's OpenMP thread count set to 1. */
struct omp_one {
    int saved;
};

static void omp_one_enter(struct omp_one *o)
{
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP
    o->saved = omp_get_max_threads();
    if (o->saved != 1)
        omp_set_num_threads(1);
#else
    o->saved = 1;
#endif
}

static void omp_one_leave(const struct omp_one *o)
{
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP
    if (o->saved != 1)
        omp_set_num_threads(o->saved);
#else
    (void)o;
#endif
}

static int errno_of(dnnl_status_t s)
{
    switch (s) {
    case dnnl_success:
        return 0;
    case dnnl_out_of_memory:
        return -ENOMEM;
    case dnnl_invalid_arguments:
        return -EINVAL;
    case dnnl_unimplemented:
        return -ENOTSUP;
    default:
        return -EIO;
    }
}

/* Grows *p (contents not kept) to bytes.  0 or -ENOMEM. */
static int reserve(void **p, size_t *size, size_t bytes)
{
    void *q;

    if (bytes <= *size)
        return 0;
    q = moe_alloc_aligned(bytes);
    if (!q)
        return -ENOMEM;
    moe_free_aligned(*p);
    *p = q;
    *size = bytes;
    return 0;
}

/* Creates the matmul primitive of one shape (calling thread's OpenMP count
 * 1).  Its impl name into impl when not NULL. */
static dnnl_status_t create_prim(const struct moe_onednn *d, bool bf16, bool transposed,
                                 struct prim *pr, const char **impl)
{
    dnnl_data_type_t dt = bf16 ? dnnl_bf16 : dnnl_f32;
    dnnl_dims_t sd = {pr->m, pr->k}, ss = {pr->k, 1};
    dnnl_dims_t wd = {pr->k, pr->n}, wst = {1, pr->k}, wsp = {pr->n, 1};
    dnnl_dims_t dd = {pr->m, pr->n}, ds = {pr->n, 1};
    dnnl_matmul_desc_t desc;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    const dnnl_memory_desc_t *pad;
    struct omp_one o;
    dnnl_status_t s;

    omp_one_enter(&o);
    s = dnnl_memory_desc_init_by_strides(&pr->src, 2, sd, dt, ss);
    if (s == dnnl_success)
        s = dnnl_memory_desc_init_by_strides(&pr->wei, 2, wd, dt, transposed ? wst : wsp);
    if (s == dnnl_success)
        s = dnnl_memory_desc_init_by_strides(&pr->dst, 2, dd, dnnl_f32, ds);
    if (s == dnnl_success)
        s = dnnl_matmul_desc_init(&desc, &pr->src, &pr->wei, NULL, &pr->dst);
    if (s == dnnl_success)
        s = dnnl_primitive_attr_create(&attr);
    if (s == dnnl_success)
        s = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    if (s == dnnl_success)
        s = dnnl_primitive_desc_create(&pd, &desc, attr, d->eng, NULL);
    if (s == dnnl_success && impl)
        s = dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, impl);
    if (s == dnnl_success) {
        pad = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
        pr->pad = *pad;
        pr->pad_bytes = dnnl_memory_desc_get_size(pad);
        s = dnnl_primitive_create(&pr->p, pd);
    }
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    if (attr)
        dnnl_primitive_attr_destroy(attr);
    omp_one_leave(&o);
    return s;
}

static void forget_prims(struct moe_onednn *d)
{
    for (int i = 0; i < d->n_prims; i++)
        dnnl_primitive_destroy(d->prims[i].p);
    d->n_prims = 0;
}

static const char *isa_name(dnnl_cpu_isa_t isa)
{
    switch ((int)isa) {
    case dnnl_cpu_isa_avx512_core_amx:
        return "avx512_core_amx";
    case dnnl_cpu_isa_avx512_core_bf16:
        return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_vnni:
        return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core:
        return "avx512_core";
    case dnnl_cpu_isa_avx2_vnni:
        return "avx2_vnni";
    case dnnl_cpu_isa_avx2:
        return "avx2";
    default:
        return "other";
    }
}

int moe_onednn_init(int n_threads, struct moe_onednn **ret, struct moe_error *err)
{
    const dnnl_version_t *v = dnnl_version();
    struct moe_onednn *d = calloc(1, sizeof(*d));
    struct prim probe = {.m = 32, .n = 64, .k = 64};
    const char *impl = "?";
    dnnl_cpu_isa_t isa;
    dnnl_status_t s;
    int r;

    if (!d || n_threads <= 0)
        goto nomem;
    d->n_threads = n_threads;
    d->tb = calloc((size_t)n_threads, sizeof(*d->tb));
    if (!d->tb)
        goto nomem;
    s = dnnl_engine_create(&d->eng, dnnl_cpu, 0);
    if (s != dnnl_success) {
        r = moe_error_set(err, errno_of(s), "oneDNN: cannot create a CPU engine (status %d)", s);
        goto fail;
    }
    for (int i = 0; i < n_threads; i++) {
        s = dnnl_stream_create(&d->tb[i].stream, d->eng, dnnl_stream_default_flags);
        if (s != dnnl_success) {
            r = moe_error_set(err, errno_of(s), "oneDNN: cannot create a stream (status %d)", s);
            goto fail;
        }
    }
    /* The variant: bf16 with transposed weights, bf16 with copied ones,
     * else fp32 (oneDNN 2.6 has no bf16 matmul without AVX-512). */
    d->bf16 = true;
    d->transposed = true;
    s = create_prim(d, true, true, &probe, &impl);
    if (s == dnnl_unimplemented) {
        d->transposed = false;
        s = create_prim(d, true, false, &probe, &impl);
    }
    if (s == dnnl_unimplemented) {
        d->bf16 = false;
        d->transposed = true;
        s = create_prim(d, false, true, &probe, &impl);
    }
    if (s != dnnl_success) {
        r = moe_error_set(err, errno_of(s), "oneDNN %d.%d.%d: no matmul for this CPU (status %d)",
                          v->major, v->minor, v->patch, s);
        goto fail;
    }
    isa = dnnl_get_effective_cpu_isa();
    d->amx = d->bf16 &&
             ((int)isa & (int)dnnl_cpu_isa_avx512_core_amx) == (int)dnnl_cpu_isa_avx512_core_amx;
    d->fast = d->bf16 &&
              ((int)isa & (int)dnnl_cpu_isa_avx512_core_bf16) == (int)dnnl_cpu_isa_avx512_core_bf16;
    snprintf(d->describe, sizeof(d->describe), "oneDNN %d.%d.%d, %s, %s matmul (%s%s)", v->major,
             v->minor, v->patch, isa_name(isa), d->bf16 ? "bf16" : "fp32", impl,
             d->transposed ? "" : ", weights copied");
    dnnl_primitive_destroy(probe.p);
    *ret = d;
    return 0;

nomem:
    r = moe_error_set(err, -ENOMEM, "oneDNN: out of memory");
fail:
    moe_onednn_free(d);
    return r;
}

void moe_onednn_free(struct moe_onednn *d)
{
    if (!d)
        return;
    forget_prims(d);
    free(d->prims);
    if (d->tb) {
        for (int i = 0; i < d->n_threads; i++) {
            if (d->tb[i].stream)
                dnnl_stream_destroy(d->tb[i].stream);
            moe_free_aligned(d->tb[i].pad);
            moe_free_aligned(d->tb[i].w);
        }
        free(d->tb);
    }
    if (d->eng)
        dnnl_engine_destroy(d->eng);
    free(d);
}

bool moe_onednn_bf16(const struct moe_onednn *d)
{
    return d->bf16;
}

bool moe_onednn_fast(const struct moe_onednn *d)
{
    return d->fast;
}

bool moe_onednn_amx(const struct moe_onednn *d)
{
    return d->amx;
}

const char *moe_onednn_describe(const struct moe_onednn *d)
{
    return d->describe;
}

void moe_onednn_begin(struct moe_onednn *d)
{
    if (d->n_prims > KEEP_PRIMS)
        forget_prims(d);
}

static struct prim *find_prim(struct moe_onednn *d, int64_t m, int64_t n, int64_t k)
{
    for (int i = 0; i < d->n_prims; i++) {
        struct prim *p = &d->prims[i];

        if (p->m == m && p->n == n && p->k == k)
            return p;
    }
    return NULL;
}

void moe_onednn_trim(struct moe_onednn *d)
{
    forget_prims(d);
    for (int i = 0; i < d->n_threads; i++) {
        struct thread_buf *t = &d->tb[i];

        moe_free_aligned(t->pad);
        moe_free_aligned(t->w);
        t->pad = t->w = NULL;
        t->pad_size = t->w_size = 0;
    }
}

int moe_onednn_prepare(struct moe_onednn *d, int64_t m, int64_t n, int64_t k)
{
    struct prim *p = find_prim(d, m, n, k);
    size_t wbytes = 0;
    dnnl_status_t s;
    int r;

    if (m <= 0 || n <= 0 || k <= 0)
        return -EINVAL;
    if (!p) {
        if (d->n_prims == d->cap_prims) {
            int cap = d->cap_prims ? 2 * d->cap_prims : 16;
            struct prim *np = realloc(d->prims, (size_t)cap * sizeof(*np));

            if (!np)
                return -ENOMEM;
            d->prims = np;
            d->cap_prims = cap;
        }
        p = &d->prims[d->n_prims];
        *p = (struct prim){.m = m, .n = n, .k = k};
        s = create_prim(d, d->bf16, d->transposed, p, NULL);
        if (s != dnnl_success)
            return errno_of(s);
        d->n_prims++;
    }
    if (!d->bf16 || !d->transposed) {
        if (!moe_mul_size((size_t)n, (size_t)k * (d->bf16 ? 2 : 4), &wbytes))
            return -ENOMEM;
    }
    for (int i = 0; i < d->n_threads; i++) {
        r = reserve(&d->tb[i].pad, &d->tb[i].pad_size, MOE_MAX(p->pad_bytes, (size_t)64));
        if (r == 0 && wbytes)
            r = reserve(&d->tb[i].w, &d->tb[i].w_size, wbytes);
        if (r < 0)
            return r;
    }
    return 0;
}

int moe_onednn_gemm(struct moe_onednn *d, int thread, int64_t m, int64_t n, int64_t k,
                    const void *x, const uint16_t *w, float *y)
{
    struct prim *p = find_prim(d, m, n, k);
    struct thread_buf *t = &d->tb[thread];
    dnnl_memory_t ms = NULL, mw = NULL, md = NULL, mp = NULL;
    const void *wp = w;
    struct omp_one o;
    dnnl_status_t s;

    if (!p || thread < 0 || thread >= d->n_threads)
        return -EINVAL;
    if (!d->bf16) {
        float *wf = t->w;

        for (size_t i = 0; i < (size_t)n * k; i++)
            wf[i] = moe_bf16_to_f32(w[i]);
        wp = wf;
    } else if (!d->transposed) {
        /* k x n rows */
        uint16_t *wt = t->w;

        for (int64_t r = 0; r < n; r++)
            for (int64_t c = 0; c < k; c++)
                wt[c * n + r] = w[r * k + c];
        wp = wt;
    }
    omp_one_enter(&o);
    s = dnnl_memory_create(&ms, &p->src, d->eng, (void *)x);
    if (s == dnnl_success)
        s = dnnl_memory_create(&mw, &p->wei, d->eng, (void *)wp);
    if (s == dnnl_success)
        s = dnnl_memory_create(&md, &p->dst, d->eng, y);
    if (s == dnnl_success)
        s = dnnl_memory_create(&mp, &p->pad, d->eng, t->pad);
    if (s == dnnl_success) {
        dnnl_exec_arg_t args[] = {
            {DNNL_ARG_SRC, ms},
            {DNNL_ARG_WEIGHTS, mw},
            {DNNL_ARG_DST, md},
            {DNNL_ARG_SCRATCHPAD, mp},
        };

        s = dnnl_primitive_execute(p->p, t->stream, (int)MOE_ARRAY_SIZE(args), args);
        if (s == dnnl_success)
            s = dnnl_stream_wait(t->stream);
    }
    if (ms)
        dnnl_memory_destroy(ms);
    if (mw)
        dnnl_memory_destroy(mw);
    if (md)
        dnnl_memory_destroy(md);
    if (mp)
        dnnl_memory_destroy(mp);
    omp_one_leave(&o);
    return errno_of(s);
}
