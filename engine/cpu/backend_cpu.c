/*
 * The CPU backend: struct moe_backend_ops over host memory, computed by a
 * thread pool running vectorised kernels (engine/cpu/kernels.h).
 *
 * Owns: the thread pool, the chosen kernel table and scratch buffers that
 * grow as needed and are reused across calls (prepared activations, the
 * SwiGLU intermediate, pointer tables, one output tile buffer per thread).
 * Memory from alloc is plain 64-byte aligned host memory.
 *
 * Kernel variant: cfg->kernel ("generic", "avx2", "avx512", "amx",
 * "onednn") if set and not "auto", else the environment variable
 * MOE_CPU_KERNEL (same names), else the best the CPU supports.  "avx512"
 * needs AVX-512 F/BW/VL/DQ/BF16/VNNI, FMA and F16C; "amx" that, AMX-BF16
 * and AMX-TILE, and the tile state granted by Linux; "avx2" needs AVX2, FMA
 * and F16C.  Forcing a variant the CPU lacks fails with -ENOTSUP.
 *
 * oneDNN (onednn.h; only where CMake found libdnnl, MOE_HAVE_ONEDNN): not a
 * kernel table but a path beside one.  "onednn" takes moed's best variant
 * for everything and oneDNN's matmul for the work items that have bf16
 * weights, compute_precision bf16 and at least DN_MIN_TOKENS tokens
 * (DN_MIN_TOKENS_AMX where oneDNN runs on AMX; prefill;
 * MOE_ONEDNN_MIN_TOKENS, a test hook, moves it).  "auto" adds it where the
 * CPU has AVX-512 BF16 or AMX-BF16, oneDNN reports that it uses them
 * (dnnl_get_effective_cpu_isa; oneDNN requests the AMX tile state from
 * Linux, ARCH_REQ_XCOMP_PERM, itself) and moed's "amx" variant cannot run
 * (its tiles beat oneDNN 2.6's at prefill); on AVX2 oneDNN 2.6 has no bf16 matmul
 * and its fp32 one on widened weights is slower than ours, so "auto" keeps
 * moed's kernels there.  exact precision never uses it: oneDNN 2.6 has no
 * matmul of fp32 activations with bf16 weights.  Such an item, in the same
 * three loops:
 *   0'. one task per item gathers its tokens' x, rounded to bf16, into
 *      [m, hidden] rows (m: its token count rounded up to DN_MPAD, rows past
 *      the tokens zero, so that few shapes need a compiled primitive);
 *   1'. tasks (item, block of DN_FBLK ffn rows): one oneDNN GEMM each for
 *      gate and up over the block's rows as stored (oneDNN repacks them),
 *      then biases and activation exactly as in 1., into the item's bf16
 *      SwiGLU rows [m, ffn];
 *   2'. in phase 2's task for hidden block h, at the item's turn: one GEMM
 *      of its SwiGLU rows with the block's down rows, added to out as in 2.
 * Every GEMM runs single-threaded on the pool thread of its task, with a
 * primitive made for one thread, so the arithmetic per element depends on
 * the shape only: results stay bit-identical for any thread count.  A
 * token's result alone may differ in its last bits from the same token in a
 * batch (m differs, and oneDNN may block K by m; the fp32 matmul of AVX2
 * machines does not: tested), and differs from moed's kernels' (another
 * summation order), both within the bf16 contract.  Primitives are made
 * before the loops on the calling thread; a oneDNN failure in phase 1 leaves
 * out untouched and is returned, one in phase 2 (not expected once the
 * primitives exist) is returned with out partly updated.
 *
 * grouped_ffn runs in three parallel loops:
 *   0. prepare every token's x in the layout the kernel reads, once per
 *      (weight dtype, precision) the work items use;
 *   1. tasks (work item, block of FBLK ffn rows): gate and up rows of the
 *      block against the item's tokens, plus their biases (gpt-oss), the
 *      expert's activation (SwiGLU, or gpt-oss's clamped one), stored
 *      (prepared) into the item's intermediate rows; FP8 items' rows are
 *      then scaled by their largest value (kernels.h, moe_cpu_make_x8),
 *      one loop over the items;
 *   2. tasks (block of HBLK hidden rows): for every work item in order, its
 *      down rows of the block against its intermediate rows, then
 *      out[t, block] += s * (y + down bias) for each of its tokens.
 * Every output element is written by one task, in work-item order, and the
 * kernels' arithmetic per element does not depend on the tiling, so results
 * are bit-identical for any thread count and any timing, and a token's
 * result does not depend on the other tokens of the batch.
 *
 * compute_precision bf16 (a work item's precision): x is prepared from its
 * bf16 rounding; gate x and up x are rounded to bf16, then silu(gate x),
 * then their product, as torch's bf16 linear, silu and mul do; the kernel's
 * dot_b16 computes every dot of such an item.
 *
 * AMX items ("amx", bf16 weights, off the oneDNN path, any token count):
 * x is prepared as plain fp32 rows; one task per item makes them the
 * item's B tiles (moe_cpu_amx_btiles) before loop 1; each loop-1 task
 * multiplies its rows on AMX tiles and makes its block of SwiGLU rows the
 * item's second B tiles in place of the prepared intermediate rows; loop 2
 * multiplies the down rows against those.  Same arithmetic per element for
 * any token count, so the bit-identity promises below hold for them too.
 *
 * act_int8 (moe_cpu_config): int8, int4 and MXFP4 experts take x and their SwiGLU
 * intermediate as int8 activations (kernels.h, moe_cpu_prep_a8) and the
 * kernel's qdot_a8, where it has one; otherwise as above.
 *
 * Locks: `lock` serialises matmul and grouped_ffn, which share the scratch
 * buffers (the pool itself serialises loops too).  alloc, mem_free,
 * copy_in and copy_out take no lock.
 *
 * Many cores on several NUMA nodes (designed, not built: the development
 * machines have one node and 2 cores).  The rule is that an expert's bytes
 * and the threads that stream them are on the same node, since decode is
 * bound by memory reads and a remote read costs about half the bandwidth.
 *   - One pool per node, its threads pinned to the node's cores; scratch
 *     first touched by them.  x (T x H floats) is prepared once per node.
 *   - The host cache keeps a slab per node (mbind MPOL_BIND) and a pager
 *     thread per node, so a page-in lands where it will be read.  Experts
 *     are placed by row slices: on node n of N, rows [n F/N, (n+1) F/N) of
 *     gate and up and rows [n H/N, (n+1) H/N) of down.  Every active expert then
 *     streams from all nodes at once (top-2 of 8 would leave most nodes idle
 *     if whole experts were placed), and phase 1 needs no cross-node
 *     traffic.  Phase 2 reads the whole intermediate (T x F floats, small)
 *     from the other nodes and writes only its own hidden rows, so out is
 *     still written by one task per element in work-item order: results
 *     stay bit-identical for any node and thread count.
 *   - Phase 2 has only H / HBLK tasks (64 for H = 4096); from about 32
 *     threads per node it takes (work item, hidden block) tasks into
 *     per-item partial rows, summed in work-item order by a last loop.
 *   - The kernels stay as they are; only the task lists are per node.  With
 *     one node (libnuma absent or reporting one) this is today's single pool.
 */
#include <assert.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "backend.h"
#include "common.h"
#include "dtype.h"
#include "threadpool.h"
#include "kernels.h"
#include "quant.h"
#ifdef MOE_HAVE_ONEDNN
#include "onednn.h"
#endif

/* ffn rows per phase-1 task: a multiple of MOE_CPU_KPAD, so that each task
 * prepares whole blocks of the intermediate rows. */
#define FBLK 64
/* hidden rows per phase-2 task */
#define HBLK 64
/* matmul task: rows x tokens */
#define MM_RBLK 64
#define MM_TBLK 64
/* elements of x prepared per phase-0 task (at least one token) */
#define PREP_ELEMS 16384
/* allocations this large are offered transparent huge pages */
#define HUGE_MIN (4u << 20)
/* oneDNN path: ffn rows per phase-1 task; token rows padded to a multiple
 * of DN_MPAD (fewer distinct shapes, so fewer primitives to compile); work
 * items with fewer tokens than DN_MIN_TOKENS (DN_MIN_TOKENS_AMX where
 * oneDNN runs on AMX tiles) keep moed's kernels (decode).  On a Sapphire
 * Rapids (2 threads, Mixtral shapes, compute_precision bf16) oneDNN's AMX
 * GEMMs beat moed's AVX-512 tiles from 6 tokens an expert: 32 tokens (3 to
 * 11 an expert) 223 -> 151 ms, 64 (11 to 21) 280 -> 161-169 ms, 8 (1 to
 * 5) unchanged at 84-87 ms, while a threshold of 5 made it 99.  Without AMX
 * (AVX-512 BF16 only) the crossover is unmeasured: 16 is kept there. */
#define DN_FBLK 256
#define DN_MPAD 16
#define DN_MIN_TOKENS 16
#define DN_MIN_TOKENS_AMX 6
/* AMX items: phase 1 turns its tokens' SwiGLU rows into B tiles this many
 * at a time (a multiple of the 5- and 16-token groups) */
#define AMX_CHUNK 80

_Static_assert(MOE_DTYPE_F32 == 0 && MOE_DTYPE_F16 == 1 && MOE_DTYPE_BF16 == 2,
               "kernel tables are indexed by dtype");
_Static_assert(FBLK % MOE_CPU_KPAD == 0, "FBLK must be whole prepared blocks");

/* Prepared-x slots: one per (weight dtype, precision), dtype + 3 * precision,
 * SLOT_A8 for int8 activations (moe_cpu_prep_a8), and SLOT_X8 + precision
 * for FP8 experts (kernels.h, moe_cpu_make_x8). */
#define N_PREP 9
#define SLOT_A8 6
#define SLOT_X8 7

/* Bytes of a row of cols elements prepared for slot d. */
static size_t slot_row(int d, int64_t cols)
{
    int64_t n = moe_cpu_kpad(cols);

    return (size_t)(d >= SLOT_X8 ? MOE_CPU_X8_ROW(n) : n) * 4;
}

/* silu alone, for kernels without swiglu_b16: swiglu(g, ones) in pieces of
 * at most ONES values (oneDNN's blocks are DN_FBLK rows, moed's FBLK) */
#define ONES 64
static const float ones[ONES] = {[0 ... ONES - 1] = 1.0f};

struct scratch {
    void *p;     /* moe_alloc_aligned, or NULL */
    size_t size; /* bytes at p */
};

struct cpu_backend {
    struct moe_backend base; /* base.priv points back here */
    const struct moe_cpu_kernel *k;
    struct moe_threadpool *pool;
    int n_threads;
    bool act_int8; /* int8 activations where the kernel has them (moe_cpu_config) */

    pthread_mutex_t lock;         /* serialises matmul and grouped_ffn */
    struct scratch xprep[N_PREP]; /* under lock: prepared x, per dtype and precision */
    struct scratch act;           /* under lock: prepared SwiGLU rows */
    struct scratch meta;          /* under lock: pointer and offset tables */
    struct scratch *ybuf;         /* under lock: [n_threads] output tiles */

    /* oneDNN prefill path (NULL: moed's kernels only) */
    struct moe_onednn *dn;
    char dn_describe[256]; /* moe_backend_cpu_describe */
    int dn_min_tokens;     /* work items with at least this many tokens use it */
    struct scratch dnbuf;  /* under lock: per oneDNN item, its x and SwiGLU rows */
    struct scratch amxbuf; /* under lock: per AMX item, its x and SwiGLU B tiles */
};

/* ---- memory ----------------------------------------------------------------- */

static void *alloc_big(size_t bytes)
{
    void *p = moe_alloc_aligned(bytes);

    if (p && bytes >= HUGE_MIN) {
        /* Fewer TLB misses when streaming weights; advice only, so its
         * failure (no THP in this kernel) is ignored. */
        uintptr_t a = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
        uintptr_t e = ((uintptr_t)p + bytes) & ~(uintptr_t)4095;

        if (e > a)
            (void)madvise((void *)a, e - a, MADV_HUGEPAGE);
    }
    return p;
}

/* Makes s at least bytes long (contents not kept).  0 or -ENOMEM. */
static int scratch_reserve(struct scratch *s, size_t bytes)
{
    size_t want;
    void *p;

    if (bytes <= s->size)
        return 0;
    /* grow by half again at least, so slowly growing batches reallocate
     * rarely */
    want = s->size + s->size / 2;
    if (want < bytes)
        want = bytes;
    p = alloc_big(want);
    if (!p) {
        want = bytes;
        p = alloc_big(want);
        if (!p)
            return -ENOMEM;
    }
    moe_free_aligned(s->p);
    s->p = p;
    s->size = want;
    return 0;
}

static void scratch_free(struct scratch *s)
{
    moe_free_aligned(s->p);
    s->p = NULL;
    s->size = 0;
}

static struct cpu_backend *cpu_of(struct moe_backend *b)
{
    return b->priv;
}

static void *cpu_alloc(struct moe_backend *b, size_t bytes)
{
    (void)b;
    return alloc_big(bytes);
}

static void cpu_mem_free(struct moe_backend *b, void *p)
{
    (void)b;
    moe_free_aligned(p);
}

static int cpu_copy(struct moe_backend *b, void *dst, const void *src, size_t bytes)
{
    (void)b;
    if (bytes == 0)
        return 0;
    if (!dst || !src)
        return -EINVAL;
    memcpy(dst, src, bytes);
    return 0;
}

/* ---- preparing activations ---------------------------------------------------- */

struct prep_ctx {
    const struct moe_cpu_kernel *k;
    const float *x; /* [n_tokens, cols] */
    int64_t cols, cols_pad;
    int n_tokens;
    int per_task;      /* tokens per task */
    unsigned dtypes;   /* bit d: prepare slot d (dtype d % 3, bf16 when d >= 3) */
    void *dst[N_PREP]; /* [n_tokens, cols_pad] prepared, per slot */
};

static void prep_task(void *arg, int task, int thread)
{
    const struct prep_ctx *c = arg;
    int t0 = task * c->per_task;
    int t1 = MOE_MIN(t0 + c->per_task, c->n_tokens);

    (void)thread;
    for (int d = 0; d < N_PREP; d++) {
        size_t row = slot_row(d, c->cols);

        if (!(c->dtypes & (1u << d)))
            continue;
        for (int t = t0; t < t1; t++) {
            void *dst = (char *)c->dst[d] + (size_t)t * row;

            if (d == SLOT_A8) {
                moe_cpu_prep_a8(c->x + (size_t)t * c->cols, c->cols, c->cols_pad, dst);
                continue;
            }
            if (d >= SLOT_X8) {
                c->k->prep[MOE_DTYPE_F32](c->x + (size_t)t * c->cols, c->cols, c->cols_pad, dst);
                if (d > SLOT_X8)
                    c->k->round[MOE_DTYPE_F32](dst, c->cols_pad);
                moe_cpu_make_x8(dst, c->cols_pad);
                continue;
            }
            c->k->prep[d % 3](c->x + (size_t)t * c->cols, c->cols, c->cols_pad, dst);
            if (d >= 3)
                c->k->round[d % 3](dst, c->cols_pad);
        }
    }
}

/* Prepares x [n_tokens, cols] for each slot in the mask into cb->xprep. */
static int prep_x(struct cpu_backend *cb, const float *x, int64_t cols, int n_tokens,
                  unsigned dtypes)
{
    struct prep_ctx c = {
        .k = cb->k,
        .x = x,
        .cols = cols,
        .cols_pad = moe_cpu_kpad(cols),
        .n_tokens = n_tokens,
        .dtypes = dtypes,
    };
    size_t bytes;
    int r;

    for (int d = 0; d < N_PREP; d++) {
        if (!(dtypes & (1u << d)))
            continue;
        if (!moe_mul_size((size_t)n_tokens, slot_row(d, cols), &bytes))
            return -ENOMEM;
        r = scratch_reserve(&cb->xprep[d], bytes);
        if (r < 0)
            return r;
        c.dst[d] = cb->xprep[d].p;
    }
    c.per_task = (int)MOE_MAX(1, PREP_ELEMS / cols);
    moe_threadpool_run(cb->pool, (n_tokens + c.per_task - 1) / c.per_task, prep_task, &c);
    return 0;
}

/* Grows every thread's output tile buffer to floats. */
static int reserve_ybuf(struct cpu_backend *cb, size_t floats)
{
    size_t bytes;

    if (!moe_mul_size(floats, sizeof(float), &bytes))
        return -ENOMEM;
    for (int i = 0; i < cb->n_threads; i++) {
        int r = scratch_reserve(&cb->ybuf[i], bytes);

        if (r < 0)
            return r;
    }
    return 0;
}

/* ---- matmul ---------------------------------------------------------------------- */

struct mm_ctx {
    const struct moe_cpu_kernel *k;
    int dt;
    const char *w;
    size_t esz;
    int64_t rows, cols;
    const void *const *xs; /* [n_tokens] prepared rows */
    int n_tokens;
    int64_t row_tasks;
    float *y;
};

static void mm_task(void *arg, int task, int thread)
{
    const struct mm_ctx *c = arg;
    int64_t r0 = (task % c->row_tasks) * MM_RBLK;
    int t0 = (int)(task / c->row_tasks) * MM_TBLK;
    int nr = (int)MOE_MIN(MM_RBLK, c->rows - r0);
    int nt = MOE_MIN(MM_TBLK, c->n_tokens - t0);

    (void)thread;
    c->k->dot[c->dt](c->w + (size_t)r0 * c->cols * c->esz, c->cols, nr, c->cols, c->xs + t0, nt,
                     c->y + (size_t)t0 * c->rows + r0, c->rows);
}

static int cpu_matmul(struct moe_backend *b, const void *w, enum moe_dtype dtype, int64_t rows,
                      int64_t cols, const float *x, int n_tokens, float *y)
{
    struct cpu_backend *cb = cpu_of(b);
    struct mm_ctx c;
    int64_t tasks;
    size_t row;
    int r;

    if (!moe_dtype_is_compute(dtype) || rows <= 0 || cols <= 0 || n_tokens < 0)
        return -EINVAL;
    if (n_tokens == 0)
        return 0;
    if (!w || !x || !y)
        return -EINVAL;

    pthread_mutex_lock(&cb->lock);
    r = prep_x(cb, x, cols, n_tokens, 1u << dtype);
    if (r < 0)
        goto out;
    r = scratch_reserve(&cb->meta, (size_t)n_tokens * sizeof(void *));
    if (r < 0)
        goto out;

    c = (struct mm_ctx){
        .k = cb->k,
        .dt = (int)dtype,
        .w = w,
        .esz = moe_dtype_size(dtype),
        .rows = rows,
        .cols = cols,
        .xs = cb->meta.p,
        .n_tokens = n_tokens,
        .row_tasks = (rows + MM_RBLK - 1) / MM_RBLK,
        .y = y,
    };
    row = (size_t)moe_cpu_kpad(cols) * 4;
    for (int t = 0; t < n_tokens; t++)
        ((const void **)cb->meta.p)[t] = (const char *)cb->xprep[dtype].p + (size_t)t * row;
    tasks = c.row_tasks * ((n_tokens + MM_TBLK - 1) / MM_TBLK);
    if (tasks > INT32_MAX) {
        r = -E2BIG;
        goto out;
    }
    moe_threadpool_run(cb->pool, (int)tasks, mm_task, &c);
out:
    pthread_mutex_unlock(&cb->lock);
    return r;
}

/* ---- grouped FFN ------------------------------------------------------------------ */

struct ffn_ctx {
    const struct moe_cpu_kernel *k;
    bool act_int8;
    const float *x; /* [n_tokens, hidden] */
    int64_t hidden;
    const struct moe_ffn_work *work;
    int n_work;
    float *out;
    const void **xs;      /* [A] prepared x row of each assignment */
    void **as;            /* [A] prepared SwiGLU row of each assignment */
    int64_t *first;       /* [n_work] index of the item's first assignment */
    int64_t *task_end;    /* [n_work] cumulative phase-1 task counts */
    size_t ystride;       /* floats between the gate and up tiles in ybuf */
    struct scratch *ybuf; /* [n_threads] */
    /* oneDNN items: dn_m[i] > 0 is the item's padded token rows, dn_x[i]
     * its x rows [dn_m, hidden] and dn_h[i] its SwiGLU rows [dn_m, ffn],
     * both bf16 values stored as bf16 or fp32 (dn_esz bytes) */
    struct moe_onednn *dn;
    int64_t *dn_m;
    char **dn_x, **dn_h;
    size_t dn_esz;
    /* AMX items (amx_parts): bx[i] and bh[i] their x and SwiGLU rows' B
     * tiles (moe_cpu_amx_btiles), NULL for other items */
    int32_t **bx, **bh;
    int dn_err; /* the first oneDNN failure (atomic), 0 if none */
};

static void round_bf16(float *v, int n)
{
    for (int i = 0; i < n; i++)
        v[i] = moe_bf16_to_f32(moe_f32_to_bf16(v[i]));
}

/*
 * The clamped SwiGLU in bf16 as torch computes it for a bf16 gpt-oss
 * (g and u already bf16): each operation's result rounded to bf16, into g.
 */
static void swiglu_clamp_b16(float *g, const float *u, int n, float alpha, float limit)
{
    const float a = moe_bf16_to_f32(moe_f32_to_bf16(alpha));
    const float lim = moe_bf16_to_f32(moe_f32_to_bf16(limit));

    for (int i = 0; i < n; i++) {
        float gc = g[i] < lim ? g[i] : lim;
        float uc = u[i] < -lim ? -lim : u[i] > lim ? lim : u[i];
        float z = moe_bf16_to_f32(moe_f32_to_bf16(gc * a));
        float sg = moe_bf16_to_f32(moe_f32_to_bf16(1.0f / (1.0f + expf(-z))));
        float glu = moe_bf16_to_f32(moe_f32_to_bf16(gc * sg));
        float u1 = moe_bf16_to_f32(moe_f32_to_bf16(uc + 1.0f));

        g[i] = moe_bf16_to_f32(moe_f32_to_bf16(u1 * glu));
    }
}

/* The kernel table's index (dtype) of a work item's prepared rows: plain
 * fp32 for quantized weights. */
static int prep_dtype(const struct moe_expert_weights *e)
{
    return e->quant.q != MOE_QUANT_NONE ? MOE_DTYPE_F32 : (int)e->dtype;
}

/* Whether expert e computes with int8 activations: asked for, and the
 * kernel has them for its format. */
static bool uses_a8(const struct moe_cpu_kernel *k, bool act_int8,
                    const struct moe_expert_weights *e)
{
    return act_int8 && e->quant.q != MOE_QUANT_NONE && k->qdot_a8[e->quant.q];
}

/* Whether expert e's activations take the FP8 layout (moe_cpu_make_x8). */
static bool uses_x8(const struct moe_cpu_kernel *k, bool act_int8,
                    const struct moe_expert_weights *e)
{
    return e->quant.q == MOE_QUANT_FP8 && !uses_a8(k, act_int8, e);
}

/* The bf16 parts per activation of work item wk on AMX tiles (3: exact,
 * 1: compute_precision bf16), 0 when it does not take them (weights not
 * bf16, or no AMX).  Called for items off the oneDNN path only. */
static int amx_parts(const struct moe_cpu_kernel *k, const struct moe_ffn_work *wk)
{
    if (!k->amx || wk->w->quant.q != MOE_QUANT_NONE || wk->w->dtype != MOE_DTYPE_BF16)
        return 0;
    return wk->precision == MOE_PRECISION_BF16 ? 1 : 3;
}

/* The prepared-x slot of a work item. */
static int prep_slot(const struct moe_cpu_kernel *k, bool act_int8, const struct moe_ffn_work *wk)
{
    if (uses_a8(k, act_int8, wk->w))
        return SLOT_A8;
    if (uses_x8(k, act_int8, wk->w))
        return SLOT_X8 + (wk->precision == MOE_PRECISION_BF16);
    if (amx_parts(k, wk))
        return MOE_DTYPE_F32 + 3 * (wk->precision == MOE_PRECISION_BF16);
    return prep_dtype(wk->w) + 3 * (wk->precision == MOE_PRECISION_BF16);
}

/* B tiles (moe_cpu_amx_btiles) of nt tokens over cols: groups of 16 / parts
 * tokens, moe_cpu_kpad(cols) / 32 tiles of 1 KiB each. */
static bool amx_size(int nt, int parts, int64_t cols, size_t *bytes)
{
    size_t groups = (size_t)(nt + 16 / parts - 1) / (size_t)(16 / parts);

    return moe_mul_size(groups * 1024, (size_t)(moe_cpu_kpad(cols) / 32), bytes);
}

/* The bytes of AMX item wk's B tiles: of x (hidden) into *bx, of its SwiGLU
 * rows into *bh; false on overflow. */
static bool amx_item_size(const struct moe_cpu_kernel *k, const struct moe_ffn_work *wk,
                          int64_t hidden, size_t *bx, size_t *bh)
{
    int parts = amx_parts(k, wk);

    return amx_size(wk->n_tokens, parts, hidden, bx) &&
           amx_size(wk->n_tokens, parts, wk->w->ffn, bh);
}

/* B tiles of the rows x[0, nt) (fp32, element 0 at step s0), steps [s0,
 * s1), every group of 16 / parts tokens, into b (ksteps tiles a group). */
static void amx_tiles(const void *const *x, int nt, int parts, int64_t s0, int64_t s1,
                      int64_t ksteps, int32_t *b)
{
    const int per = 16 / parts;

    for (int t0 = 0, g = 0; t0 < nt; t0 += per, g++) {
        const float *rows[16];
        int tt = MOE_MIN(per, nt - t0);

        for (int j = 0; j < tt; j++)
            rows[j] = x[t0 + j];
        moe_cpu_amx_btiles(rows, tt, parts, s0, s1, b + (size_t)g * ksteps * 256);
    }
}

/* Rows [r0, r0 + nr) of quantized matrix w (k columns, scales s) against
 * prepared rows x (int8 activations when a8). */
static void qdot_rows(const struct moe_cpu_kernel *k, bool a8, const struct moe_expert_weights *e,
                      const void *w, const void *s, int64_t r0, int nr, int64_t cols,
                      const void *const *x, int nt, float *y, int64_t ldy)
{
    struct moe_cpu_qw q = {.f = e->quant, .w = w, .s = s, .row0 = r0};

    (a8 ? k->qdot_a8 : k->qdot)[e->quant.q](&q, nr, cols, x, nt, y, ldy);
}

/* One token's gate (g) and up (u) rows [f0, f0 + nr) of expert e: biases,
 * then the activation, into g. */
static void act_rows(const struct moe_cpu_kernel *k, const struct moe_expert_weights *e, bool b16,
                     int64_t f0, float *g, float *u, int nr)
{
    if (e->gate_bias || e->up_bias) {
        /* torch in bf16 rounds the product, then the sum with the bias */
        if (b16) {
            round_bf16(g, nr);
            round_bf16(u, nr);
        }
        for (int i = 0; e->gate_bias && i < nr; i++)
            g[i] += e->gate_bias[f0 + i];
        for (int i = 0; e->up_bias && i < nr; i++)
            u[i] += e->up_bias[f0 + i];
        if (b16) {
            round_bf16(g, nr);
            round_bf16(u, nr);
        }
    }
    if (e->act == MOE_ACT_SWIGLU_CLAMP && b16) {
        swiglu_clamp_b16(g, u, nr, e->alpha, e->limit);
    } else if (e->act == MOE_ACT_SWIGLU_CLAMP) {
        k->swiglu_clamp(g, u, nr, e->alpha, e->limit, g);
    } else if (b16 && k->swiglu_b16) {
        k->swiglu_b16(g, u, nr, g);
    } else if (b16) {
        /* torch in bf16: h = bf16(bf16(silu(bf16(g))) * bf16(u)) */
        round_bf16(g, nr);
        round_bf16(u, nr);
        for (int i = 0; i < nr; i += ONES)
            k->swiglu(g + i, ones, MOE_MIN(ONES, nr - i), g + i);
        round_bf16(g, nr);
        for (int i = 0; i < nr; i++)
            g[i] *= u[i];
        round_bf16(g, nr);
    } else {
        k->swiglu(g, u, nr, g);
    }
}

#ifdef MOE_HAVE_ONEDNN
/* Records a oneDNN failure; the first one is returned. */
static void dn_fail(struct ffn_ctx *c, int r)
{
    int zero = 0;

    __atomic_compare_exchange_n(&c->dn_err, &zero, r, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* Phase 1 of a oneDNN item: ffn rows [DN_FBLK blk, + DN_FBLK). */
static void ffn_up_dn(struct ffn_ctx *c, int i, int64_t blk, int thread)
{
    const struct moe_ffn_work *wk = &c->work[i];
    const struct moe_expert_weights *e = wk->w;
    int64_t H = c->hidden, F = e->ffn, m = c->dn_m[i];
    int64_t f0 = blk * DN_FBLK;
    int nr = (int)MOE_MIN(DN_FBLK, F - f0);
    float *yg = c->ybuf[thread].p;
    float *yu = yg + c->ystride;
    int r;

    r = moe_onednn_gemm(c->dn, thread, m, nr, H, c->dn_x[i], (const uint16_t *)e->gate + f0 * H,
                        yg);
    if (r == 0)
        r = moe_onednn_gemm(c->dn, thread, m, nr, H, c->dn_x[i], (const uint16_t *)e->up + f0 * H,
                            yu);
    if (r < 0) {
        dn_fail(c, r);
        return;
    }
    for (int j = 0; j < wk->n_tokens; j++) {
        float *g = yg + (size_t)j * nr;
        float *u = yu + (size_t)j * nr;
        char *h = c->dn_h[i] + ((size_t)j * F + f0) * c->dn_esz;

        act_rows(c->k, e, true, f0, g, u, nr);
        /* bf16 values: either store is exact */
        if (c->dn_esz == 2)
            for (int f = 0; f < nr; f++)
                ((uint16_t *)h)[f] = moe_f32_to_bf16(g[f]);
        else
            memcpy(h, g, (size_t)nr * sizeof(float));
    }
}

/* Before phase 1, one task per oneDNN item: its x rows (bf16), padding
 * rows of x and of the SwiGLU rows zeroed. */
static void dn_gather_task(void *arg, int task, int thread)
{
    struct ffn_ctx *c = arg;
    int i = -1;

    (void)thread;
    for (int n = 0, w = 0; w < c->n_work; w++)
        if (c->dn_m[w] && n++ == task)
            i = w;
    assert(i >= 0);

    const struct moe_ffn_work *wk = &c->work[i];
    int64_t H = c->hidden, F = wk->w->ffn, m = c->dn_m[i];

    for (int64_t j = 0; j < m; j++) {
        char *dst = c->dn_x[i] + (size_t)j * H * c->dn_esz;

        if (j >= wk->n_tokens) {
            memset(dst, 0, (size_t)H * c->dn_esz);
            memset(c->dn_h[i] + (size_t)j * F * c->dn_esz, 0, (size_t)F * c->dn_esz);
            continue;
        }
        const float *src = c->x + (size_t)wk->tokens[j] * H;

        if (c->dn_esz == 2)
            for (int64_t k = 0; k < H; k++)
                ((uint16_t *)dst)[k] = moe_f32_to_bf16(src[k]);
        else
            for (int64_t k = 0; k < H; k++)
                ((float *)dst)[k] = moe_bf16_to_f32(moe_f32_to_bf16(src[k]));
    }
}
#endif

/* Before phase 1, one task per work item: an AMX item's x B tiles. */
static void amx_x_task(void *arg, int task, int thread)
{
    const struct ffn_ctx *c = arg;
    const struct moe_ffn_work *wk = &c->work[task];
    int64_t ks = moe_cpu_kpad(c->hidden) / 32;

    (void)thread;
    if (c->bx[task])
        amx_tiles(c->xs + c->first[task], wk->n_tokens, amx_parts(c->k, wk), 0, ks, ks,
                  c->bx[task]);
}

/* Phase 1: one block of FBLK ffn rows of one work item. */
static void ffn_up_task(void *arg, int task, int thread)
{
    const struct ffn_ctx *c = arg;
    int lo = 0, hi = c->n_work - 1;

    /* the work item: first with task_end > task */
    while (lo < hi) {
        int mid = (lo + hi) / 2;

        if (c->task_end[mid] > task)
            hi = mid;
        else
            lo = mid + 1;
    }

    int64_t blk = task - (lo ? c->task_end[lo - 1] : 0);
#ifdef MOE_HAVE_ONEDNN
    if (c->dn_m[lo]) {
        ffn_up_dn(arg, lo, blk, thread);
        return;
    }
#endif

    const struct moe_ffn_work *wk = &c->work[lo];
    const struct moe_expert_weights *e = wk->w;
    int64_t H = c->hidden, F = e->ffn;
    int64_t f0 = blk * FBLK;
    int nr = (int)MOE_MIN(FBLK, F - f0);
    int64_t chunk = MOE_MIN(f0 + FBLK, moe_cpu_kpad(F)) - f0;
    size_t esz = moe_dtype_size(e->dtype);
    size_t woff = (size_t)f0 * H * esz;
    int d = prep_dtype(e);
    float *yg = c->ybuf[thread].p;
    float *yu = yg + c->ystride;
    const void *const *xs = c->xs + c->first[lo];
    void *const *as = c->as + c->first[lo];

    bool b16 = wk->precision == MOE_PRECISION_BF16;
    bool a8 = uses_a8(c->k, c->act_int8, e);
    moe_cpu_dot_fn dot = b16 ? c->k->dot_b16[d] : c->k->dot[d];

    if (c->bx[lo]) {
        /* AMX: the SwiGLU rows become phase 2's B tiles, steps f0 / 32 on */
        int parts = amx_parts(c->k, wk);
        int64_t ksh = moe_cpu_kpad(F) / 32;
        const void *g[AMX_CHUNK];

        moe_cpu_amx_dot((const char *)e->gate + woff, H, nr, H, c->bx[lo], moe_cpu_kpad(H) / 32,
                        wk->n_tokens, parts, yg, FBLK);
        moe_cpu_amx_dot((const char *)e->up + woff, H, nr, H, c->bx[lo], moe_cpu_kpad(H) / 32,
                        wk->n_tokens, parts, yu, FBLK);
        for (int t0 = 0; t0 < wk->n_tokens; t0 += AMX_CHUNK) {
            int tt = MOE_MIN(AMX_CHUNK, wk->n_tokens - t0);

            for (int j = 0; j < tt; j++) {
                float *gj = yg + (size_t)(t0 + j) * FBLK;

                act_rows(c->k, e, b16, f0, gj, yu + (size_t)(t0 + j) * FBLK, nr);
                memset(gj + nr, 0, (size_t)(chunk - nr) * sizeof(float));
                g[j] = gj;
            }
            /* t0 is a multiple of every group size (1, 5 or 16 tokens) */
            amx_tiles(g, tt, parts, f0 / 32, (f0 + chunk) / 32, ksh,
                      c->bh[lo] + (size_t)(t0 / (16 / parts)) * ksh * 256);
        }
        return;
    }
    if (e->quant.q != MOE_QUANT_NONE) {
        qdot_rows(c->k, a8, e, e->gate, e->gate_s, f0, nr, H, xs, wk->n_tokens, yg, FBLK);
        qdot_rows(c->k, a8, e, e->up, e->up_s, f0, nr, H, xs, wk->n_tokens, yu, FBLK);
    } else {
        dot((const char *)e->gate + woff, H, nr, H, xs, wk->n_tokens, yg, FBLK);
        dot((const char *)e->up + woff, H, nr, H, xs, wk->n_tokens, yu, FBLK);
    }
    for (int j = 0; j < wk->n_tokens; j++) {
        float *g = yg + (size_t)j * FBLK;
        float *u = yu + (size_t)j * FBLK;

        act_rows(c->k, e, b16, f0, g, u, nr);
        /* bf16 values prepare exactly: no rounding needed after */
        if (a8)
            moe_cpu_prep_a8(g, nr, chunk, (char *)as[j] + (size_t)f0 * 4);
        else
            c->k->prep[d](g, nr, chunk, (char *)as[j] + (size_t)f0 * 4);
        /* bf16 values already: round[] changes none, only the layout, where
         * the variant's dot_b16 reads another (AVX-512's bf16 weights) */
        if (b16 && !a8)
            c->k->round[d]((char *)as[j] + (size_t)f0 * 4, chunk);
    }
}

/* Between phases 1 and 2: the SwiGLU rows of work item `task`, if its
 * activations take the FP8 layout, made it (each row needs its largest
 * value, so the phase-1 tasks, which write FBLK columns each, cannot). */
static void ffn_x8_task(void *arg, int task, int thread)
{
    const struct ffn_ctx *c = arg;
    const struct moe_ffn_work *wk = &c->work[task];

    (void)thread;
    if (wk->n_tokens == 0 || c->dn_m[task] || !uses_x8(c->k, c->act_int8, wk->w))
        return;
    for (int j = 0; j < wk->n_tokens; j++)
        moe_cpu_make_x8(c->as[c->first[task] + j], moe_cpu_kpad(wk->w->ffn));
}

/* Phase 2: one block of HBLK hidden rows, every work item in order. */
static void ffn_down_task(void *arg, int task, int thread)
{
    struct ffn_ctx *c = arg;
    int64_t H = c->hidden;
    int64_t h0 = (int64_t)task * HBLK;
    int nr = (int)MOE_MIN(HBLK, H - h0);
    float *y = c->ybuf[thread].p;

    for (int i = 0; i < c->n_work; i++) {
        const struct moe_ffn_work *wk = &c->work[i];
        const struct moe_expert_weights *e = wk->w;
        int64_t F = e->ffn;

        int64_t ldy = HBLK;

        if (wk->n_tokens == 0)
            continue;
        if (c->dn_m[i]) {
#ifdef MOE_HAVE_ONEDNN
            int r = moe_onednn_gemm(c->dn, thread, c->dn_m[i], nr, F, c->dn_h[i],
                                    (const uint16_t *)e->down + h0 * F, y);

            if (r < 0) {
                dn_fail(c, r);
                continue;
            }
            ldy = nr;
#endif
        } else if (c->bh[i]) {
            moe_cpu_amx_dot((const uint16_t *)e->down + (size_t)h0 * F, F, nr, F, c->bh[i],
                            moe_cpu_kpad(F) / 32, wk->n_tokens, amx_parts(c->k, wk), y, HBLK);
        } else if (e->quant.q != MOE_QUANT_NONE) {
            qdot_rows(c->k, uses_a8(c->k, c->act_int8, e), e, e->down, e->down_s, h0, nr, F,
                      (const void *const *)(c->as + c->first[i]), wk->n_tokens, y, HBLK);
        } else {
            moe_cpu_dot_fn dot =
                wk->precision == MOE_PRECISION_BF16 ? c->k->dot_b16[e->dtype] : c->k->dot[e->dtype];

            dot((const char *)e->down + (size_t)h0 * F * moe_dtype_size(e->dtype), F, nr, F,
                (const void *const *)(c->as + c->first[i]), wk->n_tokens, y, HBLK);
        }
        for (int j = 0; j < wk->n_tokens; j++) {
            float *o = c->out + (size_t)wk->tokens[j] * H + h0;
            const float *yj = y + (size_t)j * ldy;
            float s = wk->scales[j];

            if (e->down_bias) {
                const float *db = e->down_bias + h0;

                for (int r = 0; r < nr; r++)
                    o[r] += s * (yj[r] + db[r]);
            } else {
                for (int r = 0; r < nr; r++)
                    o[r] += s * yj[r];
            }
        }
    }
}

/* Checks one work item; -EINVAL if it is malformed. */
static int check_work(const struct moe_ffn_work *wk, int64_t hidden, int n_tokens)
{
    const struct moe_expert_weights *e = wk->w;

    if (wk->n_tokens < 0 || wk->n_tokens > n_tokens)
        return -EINVAL;
    if (wk->precision != MOE_PRECISION_EXACT && wk->precision != MOE_PRECISION_BF16)
        return -EINVAL;
    if (wk->n_tokens == 0)
        return 0;
    if (!e || !wk->tokens || !wk->scales || !e->gate || !e->up || !e->down)
        return -EINVAL;
    if (e->hidden != hidden || e->ffn <= 0 || e->ffn > INT32_MAX)
        return -EINVAL;
    if (e->act != MOE_ACT_SILU && e->act != MOE_ACT_SWIGLU_CLAMP)
        return -EINVAL;
    if (e->act == MOE_ACT_SWIGLU_CLAMP &&
        !(isfinite(e->alpha) && e->alpha > 0 && isfinite(e->limit) && e->limit > 0))
        return -EINVAL;
    if (e->quant.q != MOE_QUANT_NONE) {
        /* the layout quant.h and kernels.h describe */
        if (e->quant.q >= MOE_QUANT_COUNT || e->hidden % 32 || e->ffn % 32 || e->quant.bcols <= 0 ||
            e->quant.bcols % 32 || e->quant.brows <= 0 ||
            (e->quant.q != MOE_QUANT_FP8 && e->quant.brows != 1) ||
            (e->quant.q == MOE_QUANT_MXFP4 && e->quant.bcols != 32) || !e->gate_s || !e->up_s ||
            !e->down_s || e->dtype != moe_quant_value_dtype(e->quant.q))
            return -EINVAL;
    } else if (!moe_dtype_is_compute(e->dtype)) {
        return -EINVAL;
    }
    for (int j = 0; j < wk->n_tokens; j++)
        if (wk->tokens[j] < 0 || wk->tokens[j] >= n_tokens)
            return -EINVAL;
    return 0;
}

/* Whether work item wk takes the oneDNN path: bf16 weights in
 * compute_precision bf16, enough tokens. */
static bool use_dn(const struct cpu_backend *cb, const struct moe_ffn_work *wk)
{
    return cb->dn && wk->n_tokens >= cb->dn_min_tokens && wk->precision == MOE_PRECISION_BF16 &&
           wk->w->quant.q == MOE_QUANT_NONE && wk->w->dtype == MOE_DTYPE_BF16;
}

#ifdef MOE_HAVE_ONEDNN
/* Makes the oneDNN GEMMs of item wk (padded to m rows) ready. */
static int dn_prepare(struct cpu_backend *cb, const struct moe_ffn_work *wk, int64_t m,
                      int64_t hidden)
{
    int64_t F = wk->w->ffn;
    int64_t shapes[4][2] = {
        {MOE_MIN(DN_FBLK, F), hidden},
        {F % DN_FBLK, hidden},
        {MOE_MIN(HBLK, hidden), F},
        {hidden % HBLK, F},
    };

    for (int s = 0; s < 4; s++) {
        int r;

        if (shapes[s][0] == 0)
            continue;
        r = moe_onednn_prepare(cb->dn, m, shapes[s][0], shapes[s][1]);
        if (r < 0)
            return r;
    }
    return 0;
}
#endif

static int cpu_grouped_ffn(struct moe_backend *b, const float *x, int64_t hidden, int n_tokens,
                           const struct moe_ffn_work *work, int n_work, float *out)
{
    struct cpu_backend *cb = cpu_of(b);
    struct ffn_ctx c = {.k = cb->k,
                        .act_int8 = cb->act_int8,
                        .x = x,
                        .hidden = hidden,
                        .work = work,
                        .n_work = n_work,
                        .out = out};
    int64_t n_assign = 0, up_tasks = 0, max_m = 0;
    size_t act_bytes = 0, dn_bytes = 0, amx_bytes = 0, meta_bytes;
    size_t dn_esz = 4;
    unsigned dtypes = 0;
    int max_nt = 0, n_dn = 0, n_x8 = 0, n_amx = 0, r;
    char *act;

    if (hidden <= 0 || hidden > INT32_MAX || n_tokens < 0 || n_work < 0)
        return -EINVAL;
    if (n_tokens == 0 || n_work == 0)
        return 0;
    if (!x || !out || !work)
        return -EINVAL;
#ifdef MOE_HAVE_ONEDNN
    if (cb->dn)
        dn_esz = moe_onednn_bf16(cb->dn) ? 2 : 4;
#endif
    for (int i = 0; i < n_work; i++) {
        const struct moe_ffn_work *wk = &work[i];
        size_t bytes;

        r = check_work(wk, hidden, n_tokens);
        if (r < 0)
            return r;
        if (wk->n_tokens == 0)
            continue;
        n_assign += wk->n_tokens;
        if (use_dn(cb, wk)) {
            int64_t m = (wk->n_tokens + DN_MPAD - 1) / DN_MPAD * DN_MPAD;
            size_t xb, hb;

            n_dn++;
            max_m = MOE_MAX(max_m, m);
            up_tasks += (wk->w->ffn + DN_FBLK - 1) / DN_FBLK;
            /* x and SwiGLU rows, each rounded up to 64 bytes */
            if (!moe_mul_size((size_t)m * dn_esz, (size_t)hidden, &xb) ||
                !moe_mul_size((size_t)m * dn_esz, (size_t)wk->w->ffn, &hb) ||
                !moe_add_size(dn_bytes, xb + 64, &dn_bytes) ||
                !moe_add_size(dn_bytes, hb + 64, &dn_bytes))
                return -ENOMEM;
            continue;
        }
        up_tasks += (wk->w->ffn + FBLK - 1) / FBLK;
        max_nt = MOE_MAX(max_nt, wk->n_tokens);
        dtypes |= 1u << prep_slot(cb->k, cb->act_int8, wk);
        n_x8 += uses_x8(cb->k, cb->act_int8, wk->w);
        if (amx_parts(cb->k, wk)) {
            size_t bx = 0, bh = 0;

            /* B tiles of x and of the SwiGLU rows instead of the latter */
            n_amx++;
            if (!amx_item_size(cb->k, wk, hidden, &bx, &bh) ||
                !moe_add_size(amx_bytes, bx + bh, &amx_bytes))
                return -ENOMEM;
            continue;
        }
        if (!moe_mul_size((size_t)wk->n_tokens,
                          slot_row(prep_slot(cb->k, cb->act_int8, wk), wk->w->ffn), &bytes) ||
            !moe_add_size(act_bytes, bytes, &act_bytes))
            return -ENOMEM;
    }
    if (n_assign == 0)
        return 0;
    if (up_tasks > INT32_MAX)
        return -E2BIG;

    if (!moe_mul_size((size_t)n_assign, 2 * sizeof(void *), &meta_bytes) ||
        !moe_add_size(meta_bytes, (size_t)n_work * (3 * sizeof(int64_t) + 4 * sizeof(char *)),
                      &meta_bytes))
        return -ENOMEM;

    pthread_mutex_lock(&cb->lock);
    r = scratch_reserve(&cb->meta, meta_bytes);
    if (r < 0)
        goto out;
    r = scratch_reserve(&cb->act, act_bytes);
    if (r < 0)
        goto out;
    r = scratch_reserve(&cb->dnbuf, dn_bytes);
    if (r < 0)
        goto out;
    r = scratch_reserve(&cb->amxbuf, amx_bytes);
    if (r < 0)
        goto out;
    /* gate and up tiles: moed's kernels' [max_nt, FBLK], oneDNN's
     * [max_m, DN_FBLK] (which also holds its down tile [max_m, HBLK]) */
    c.ystride = MOE_MAX((size_t)max_nt * MOE_MAX(FBLK, HBLK), (size_t)max_m * DN_FBLK);
    r = reserve_ybuf(cb, 2 * c.ystride);
    if (r < 0)
        goto out;
    if (dtypes) {
        r = prep_x(cb, x, hidden, n_tokens, dtypes);
        if (r < 0)
            goto out;
    }

    /* tables: assignment pointers, then per-item offsets, task ends and
     * oneDNN rows */
    c.xs = cb->meta.p;
    c.as = (void **)(c.xs + n_assign);
    c.first = (int64_t *)(c.as + n_assign);
    c.task_end = c.first + n_work;
    c.dn_m = c.task_end + n_work;
    c.dn_x = (char **)(c.dn_m + n_work);
    c.dn_h = c.dn_x + n_work;
    c.bx = (int32_t **)(c.dn_h + n_work);
    c.bh = c.bx + n_work;
    c.ybuf = cb->ybuf;
    c.dn = cb->dn;
    c.dn_esz = dn_esz;
    act = cb->act.p;
    {
        int64_t a = 0, tasks = 0;
        uintptr_t dnp = (uintptr_t)cb->dnbuf.p;
        char *amxp = cb->amxbuf.p;

        for (int i = 0; i < n_work; i++) {
            const struct moe_ffn_work *wk = &work[i];
            const char *xp;
            size_t frow, hrow;
            int d;

            c.first[i] = a;
            c.dn_m[i] = 0;
            c.dn_x[i] = c.dn_h[i] = NULL;
            c.bx[i] = c.bh[i] = NULL;
            if (wk->n_tokens > 0 && use_dn(cb, wk)) {
                int64_t m = (wk->n_tokens + DN_MPAD - 1) / DN_MPAD * DN_MPAD;

                c.dn_m[i] = m;
                dnp = (dnp + 63) & ~(uintptr_t)63;
                c.dn_x[i] = (char *)dnp;
                dnp += (size_t)m * hidden * dn_esz;
                dnp = (dnp + 63) & ~(uintptr_t)63;
                c.dn_h[i] = (char *)dnp;
                dnp += (size_t)m * wk->w->ffn * dn_esz;
                tasks += (wk->w->ffn + DN_FBLK - 1) / DN_FBLK;
                a += wk->n_tokens;
            } else if (wk->n_tokens > 0) {
                tasks += (wk->w->ffn + FBLK - 1) / FBLK;
                d = prep_slot(cb->k, cb->act_int8, wk);
                xp = cb->xprep[d].p;
                hrow = slot_row(d, hidden);
                frow = slot_row(d, wk->w->ffn);
                if (amx_parts(cb->k, wk)) {
                    size_t bx = 0, bh = 0;

                    /* sized without overflow above */
                    (void)amx_item_size(cb->k, wk, hidden, &bx, &bh);
                    c.bx[i] = (int32_t *)amxp;
                    c.bh[i] = (int32_t *)(amxp + bx);
                    amxp += bx + bh;
                    frow = 0; /* no SwiGLU rows of its own */
                }
                for (int j = 0; j < wk->n_tokens; j++, a++) {
                    c.xs[a] = xp + (size_t)wk->tokens[j] * hrow;
                    c.as[a] = NULL;
                    if (frow) {
                        c.as[a] = act;
                        act += frow;
                    }
                }
            }
            c.task_end[i] = tasks;
        }
        assert(a == n_assign && tasks == up_tasks);
    }

#ifdef MOE_HAVE_ONEDNN
    if (n_dn) {
        moe_onednn_begin(cb->dn);
        for (int i = 0; i < n_work && r == 0; i++)
            if (c.dn_m[i])
                r = dn_prepare(cb, &work[i], c.dn_m[i], hidden);
        if (r < 0)
            goto out;
        moe_threadpool_run(cb->pool, n_dn, dn_gather_task, &c);
    }
#endif
    if (n_amx)
        moe_threadpool_run(cb->pool, n_work, amx_x_task, &c);
    moe_threadpool_run(cb->pool, (int)up_tasks, ffn_up_task, &c);
    /* a oneDNN failure in phase 1 leaves out untouched */
    r = __atomic_load_n(&c.dn_err, __ATOMIC_RELAXED);
    if (r < 0)
        goto out;
    if (n_x8)
        moe_threadpool_run(cb->pool, n_work, ffn_x8_task, &c);
    moe_threadpool_run(cb->pool, (int)((hidden + HBLK - 1) / HBLK), ffn_down_task, &c);
    r = __atomic_load_n(&c.dn_err, __ATOMIC_RELAXED);
out:
    pthread_mutex_unlock(&cb->lock);
    return r;
}

/* ---- creation and kernel choice ----------------------------------------------------- */

/* Frees every scratch buffer (lock held, or the backend going away). */
static void scratch_free_all(struct cpu_backend *cb)
{
    for (int d = 0; d < N_PREP; d++)
        scratch_free(&cb->xprep[d]);
    scratch_free(&cb->act);
    scratch_free(&cb->meta);
    scratch_free(&cb->dnbuf);
    scratch_free(&cb->amxbuf);
    if (cb->ybuf)
        for (int i = 0; i < cb->n_threads; i++)
            scratch_free(&cb->ybuf[i]);
}

/* The trim slot: scratch grown for a large batch is freed; the next call
 * allocates what it needs. */
static void cpu_trim(struct moe_backend *b)
{
    struct cpu_backend *cb = cpu_of(b);

    pthread_mutex_lock(&cb->lock);
    scratch_free_all(cb);
#ifdef MOE_HAVE_ONEDNN
    if (cb->dn)
        moe_onednn_trim(cb->dn);
#endif
    pthread_mutex_unlock(&cb->lock);
}

static void cpu_free(struct moe_backend *b)
{
    struct cpu_backend *cb;

    if (!b)
        return;
    cb = cpu_of(b);
    moe_threadpool_free(cb->pool);
#ifdef MOE_HAVE_ONEDNN
    moe_onednn_free(cb->dn);
#endif
    scratch_free_all(cb);
    free(cb->ybuf);
    pthread_mutex_destroy(&cb->lock);
    free(cb);
}

static const struct moe_backend_ops cpu_ops = {
    .name = "cpu",
    .host_memory = true,
    .free = cpu_free,
    .alloc = cpu_alloc,
    .mem_free = cpu_mem_free,
    .copy_in = cpu_copy,
    .copy_out = cpu_copy,
    .matmul = cpu_matmul,
    .grouped_ffn = cpu_grouped_ffn,
    .trim = cpu_trim,
};

/* clang before 16 does not know __builtin_cpu_supports("f16c"). */
static bool cpu_has_f16c(void)
{
#if defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
    unsigned a, b, c, d;

    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
#elif defined(__x86_64__) || defined(__i386__)
    return __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

/* CPUID leaf 7's EDX bits of AMX: BF16 (22) and TILE (24). */
#define CPUID7_AMX_BF16 (1u << 22)
#define CPUID7_AMX_TILE (1u << 24)

#if defined(__x86_64__) || defined(__i386__)
/* Whether the CPU has every AMX feature in bits (CPUID7_AMX_*). */
static bool cpu_has_amx(unsigned bits)
{
    unsigned a, b, c, d;

    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & bits) == bits;
}
#endif

/* Writes the features the variant needs and the CPU lacks into missing
 * (", "-separated; "" when none). */
static void missing_features(const struct moe_cpu_kernel *k, char *missing, size_t size)
{
    struct feature {
        const char *name;
        bool have;
    } f[11];
    int n = 0;

    missing[0] = '\0';
    if (k == &moe_cpu_kernel_generic)
        return;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (k == &moe_cpu_kernel_avx512 || k == &moe_cpu_kernel_amx) {
        f[n++] = (struct feature){"avx512f", __builtin_cpu_supports("avx512f")};
        f[n++] = (struct feature){"avx512bw", __builtin_cpu_supports("avx512bw")};
        f[n++] = (struct feature){"avx512vl", __builtin_cpu_supports("avx512vl")};
        f[n++] = (struct feature){"avx512dq", __builtin_cpu_supports("avx512dq")};
        f[n++] = (struct feature){"avx512bf16", __builtin_cpu_supports("avx512bf16")};
        f[n++] = (struct feature){"avx512vnni", __builtin_cpu_supports("avx512vnni")};
    } else {
        f[n++] = (struct feature){"avx2", __builtin_cpu_supports("avx2")};
    }
    f[n++] = (struct feature){"fma", __builtin_cpu_supports("fma")};
    f[n++] = (struct feature){"f16c", cpu_has_f16c()};
    if (k == &moe_cpu_kernel_amx) {
        bool cpu = cpu_has_amx(CPUID7_AMX_BF16 | CPUID7_AMX_TILE);

        f[n++] = (struct feature){"amx-bf16, amx-tile", cpu};
        /* Linux grants the tile state on request (5.16 on) */
        f[n++] = (struct feature){"AMX tile state from Linux (arch_prctl)",
                                  !cpu || moe_cpu_amx_enable() == 0};
    }
#else
    f[n++] = (struct feature){"x86-64", false};
#endif
    for (int i = 0; i < n; i++) {
        size_t len = strlen(missing);

        if (!f[i].have)
            snprintf(missing + len, size - len, "%s%s", len ? ", " : "", f[i].name);
    }
}

static const struct moe_cpu_kernel *const kernels[] = {
    &moe_cpu_kernel_amx,
    &moe_cpu_kernel_avx512,
    &moe_cpu_kernel_avx2,
    &moe_cpu_kernel_generic,
};

/* Whether the CPU has what oneDNN's bf16 kernels need (AVX-512 BF16 or
 * AMX-BF16), into missing when it has not; for "auto" and the listing.
 * oneDNN checks again itself (and asks Linux for the AMX tile state). */
static bool onednn_cpu(char *missing, size_t size)
{
    bool have = false;

#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    have = __builtin_cpu_supports("avx512bf16") || cpu_has_amx(CPUID7_AMX_BF16);
#endif
    snprintf(missing, size, "%s", have ? "" : "avx512bf16 and amx-bf16");
    return have;
}

/* Sets *dn: 0 no oneDNN, 1 asked for by name ("onednn"), 2 "auto" (used if
 * oneDNN runs bf16 natively). */
static int pick_kernel(const struct moe_cpu_config *cfg, const struct moe_cpu_kernel **ret, int *dn,
                       struct moe_error *err)
{
    const char *want = cfg ? cfg->kernel : NULL;
    const char *from = "the configuration";
    char missing[128];

    *dn = 0;
    if (!want || !*want || !strcmp(want, "auto")) {
        want = getenv("MOE_CPU_KERNEL");
        from = "MOE_CPU_KERNEL";
    }
    if (want && !strcmp(want, "onednn")) {
#ifndef MOE_HAVE_ONEDNN
        return moe_error_set(
            err, -ENOTSUP,
            "CPU kernel 'onednn' (from %s): this moed was built without oneDNN "
            "(libdnnl-dev not found at configure time, or MOED_ONEDNN=OFF); use 'auto', "
            "'avx2' or 'generic'",
            from);
#else
        *dn = 1;
        want = NULL; /* moed's best kernel for everything else */
#endif
    }
    if (!want || !*want || !strcmp(want, "auto")) {
#ifdef MOE_HAVE_ONEDNN
        if (*dn == 0 && onednn_cpu(missing, sizeof(missing)))
            *dn = 2;
#endif
        for (size_t i = 0; i < MOE_ARRAY_SIZE(kernels); i++) {
            missing_features(kernels[i], missing, sizeof(missing));
            if (!missing[0]) {
                *ret = kernels[i];
                return 0;
            }
        }
        return moe_error_set(err, -ENOTSUP, "no CPU kernel available"); /* not reached */
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(kernels); i++) {
        if (strcmp(want, kernels[i]->name) != 0)
            continue;
        missing_features(kernels[i], missing, sizeof(missing));
        if (missing[0])
            return moe_error_set(err, -ENOTSUP,
                                 "CPU kernel '%s' (from %s) needs %s, which this CPU lacks; "
                                 "use 'auto', 'avx2' or 'generic'",
                                 want, from, missing);
        *ret = kernels[i];
        return 0;
    }
    return moe_error_set(
        err, -EINVAL,
        "unknown CPU kernel '%s' (from %s); expected auto, generic, avx2, avx512, amx or onednn",
        want, from);
}

/* The oneDNN path: dn as pick_kernel sets it.  MOE_ONEDNN_MIN_TOKENS (a
 * test hook) overrides the work-item size from which it is used. */
static int init_onednn(struct cpu_backend *cb, int dn, struct moe_error *err)
{
    const char *env = getenv("MOE_ONEDNN_MIN_TOKENS");
    char *end;
    long v;

    cb->dn_min_tokens = 0;
    if (env && *env) {
        errno = 0;
        v = strtol(env, &end, 10);
        if (errno || *end || end == env || v < 1 || v > INT32_MAX)
            return moe_error_set(err, -EINVAL,
                                 "MOE_ONEDNN_MIN_TOKENS '%s' is not a whole number from 1 to %d",
                                 env, INT32_MAX);
        cb->dn_min_tokens = (int)v;
    }
    /* auto: moed's AMX tiles beat oneDNN 2.6.3's at prefill (a Sapphire
     * Rapids, 2 threads, bf16 precision: see README, Performance) */
    if (dn == 0 || (dn == 2 && cb->k->amx))
        return 0;
#ifdef MOE_HAVE_ONEDNN
    {
        struct moe_error e2 = {0};
        int r = moe_onednn_init(cb->n_threads, &cb->dn, dn == 1 ? err : &e2);

        if (r < 0 && dn == 1)
            return r;
        if (r < 0)
            return 0; /* auto: moed's kernels */
        /* auto: only where oneDNN runs bf16 natively */
        if (dn == 2 && !moe_onednn_fast(cb->dn)) {
            moe_onednn_free(cb->dn);
            cb->dn = NULL;
            return 0;
        }
        if (cb->dn_min_tokens == 0)
            cb->dn_min_tokens = moe_onednn_amx(cb->dn) ? DN_MIN_TOKENS_AMX : DN_MIN_TOKENS;
        snprintf(cb->dn_describe, sizeof(cb->dn_describe),
                 "onednn (%s; from %d tokens per expert, else %s)", moe_onednn_describe(cb->dn),
                 cb->dn_min_tokens, cb->k->name);
    }
#else
    (void)err;
#endif
    return 0;
}

int moe_backend_cpu_init(const struct moe_cpu_config *cfg, struct moe_backend **ret,
                         struct moe_error *err)
{
    struct cpu_backend *cb;
    int dn, r;

    if (cfg && cfg->n_threads < 0)
        return moe_error_set(err, -EINVAL, "CPU backend: n_threads %d is negative", cfg->n_threads);
    cb = calloc(1, sizeof(*cb));
    if (!cb)
        return moe_error_set(err, -ENOMEM, "CPU backend: out of memory");
    cb->base.ops = &cpu_ops;
    cb->base.priv = cb;
    r = -pthread_mutex_init(&cb->lock, NULL);
    if (r < 0) {
        free(cb);
        return moe_error_set(err, r, "CPU backend: cannot create a mutex");
    }
    r = pick_kernel(cfg, &cb->k, &dn, err);
    if (r < 0)
        goto out_free;
    cb->act_int8 = cfg && cfg->act_int8;
    r = moe_threadpool_init(cfg ? cfg->n_threads : 0, &cb->pool);
    if (r < 0) {
        moe_error_set(err, r, "CPU backend: cannot start %d threads", cfg ? cfg->n_threads : 0);
        goto out_free;
    }
    cb->n_threads = moe_threadpool_size(cb->pool);
    cb->ybuf = calloc((size_t)cb->n_threads, sizeof(*cb->ybuf));
    if (!cb->ybuf) {
        r = moe_error_set(err, -ENOMEM, "CPU backend: out of memory");
        goto out_free;
    }
    r = init_onednn(cb, dn, err);
    if (r < 0)
        goto out_free;
    *ret = &cb->base;
    return 0;

out_free:
    cpu_free(&cb->base);
    return r;
}

int moe_backend_cpu_kernels(struct moe_cpu_kernel_info *info, int n)
{
    static const char *const needs[] = {
        ("avx512f, avx512bw, avx512vl, avx512dq, avx512bf16, avx512vnni, fma, f16c, amx-bf16, "
         "amx-tile, AMX tile state from Linux"),
        "avx512f, avx512bw, avx512vl, avx512dq, avx512bf16, avx512vnni, fma, f16c",
        "avx2, fma, f16c",
        "",
    };
    _Static_assert(MOE_ARRAY_SIZE(needs) == MOE_ARRAY_SIZE(kernels), "one line per kernel");
    bool picked = false;
    char cpu[128];
    int total = (int)MOE_ARRAY_SIZE(kernels) + 1;

    /* first oneDNN: prefill on top of moed's best kernel */
    if (n > 0) {
        bool fast = onednn_cpu(cpu, sizeof(cpu));
        char amx_missing[128];

        /* moed's amx kernel does prefill itself where it runs */
        missing_features(&moe_cpu_kernel_amx, amx_missing, sizeof(amx_missing));
        info[0].name = "onednn";
        info[0].needs = "oneDNN (libdnnl-dev) at build time";
#ifdef MOE_HAVE_ONEDNN
        info[0].missing[0] = '\0';
        info[0].available = true;
        info[0].auto_pick = fast && amx_missing[0];
        snprintf(info[0].note, sizeof(info[0].note),
                 "prefill of bf16 experts in compute_precision bf16; auto uses it with "
                 "avx512bf16 where the amx kernel cannot run%s",
                 !fast             ? ", which this CPU lacks"
                 : !amx_missing[0] ? " (it can here)"
                                   : "");
#else
        (void)fast;
        snprintf(info[0].missing, sizeof(info[0].missing), "oneDNN (not built)");
        info[0].available = false;
        info[0].auto_pick = false;
        info[0].note[0] = '\0';
#endif
    }
    for (int i = 1; i < n && i < total; i++) {
        info[i].name = kernels[i - 1]->name;
        info[i].needs = needs[i - 1];
        missing_features(kernels[i - 1], info[i].missing, sizeof(info[i].missing));
        info[i].available = !info[i].missing[0];
        info[i].auto_pick = info[i].available && !picked;
        picked = picked || info[i].available;
        info[i].note[0] = '\0';
    }
    return total;
}

const char *moe_backend_cpu_kernel(const struct moe_backend *b)
{
    const struct cpu_backend *cb = b->priv;

    return cb->dn ? "onednn" : cb->k->name;
}

const char *moe_backend_cpu_describe(const struct moe_backend *b)
{
    const struct cpu_backend *cb = b->priv;

    return cb->dn ? cb->dn_describe : cb->k->name;
}
