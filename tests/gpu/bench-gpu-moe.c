/*
 * GPU benchmark of the CUDA backend's grouped expert FFN on resident,
 * real-sized layers, each figure next to the limit it is judged against,
 * measured in the same run:
 *   decode (1, 8, 64 tokens): bytes of the activated experts' weights per
 *     second, against a device-to-device cudaMemcpy (read + write bytes per
 *     second; target ratio 0.7);
 *   prefill (512, 4096 tokens): TFLOP/s, against one plain cuBLAS bf16 GEMM
 *     of the same FLOPs (target 0.8);
 *   page-in: GPU tier upload from registered host memory, against a
 *     cudaMemcpyAsync from cudaHostAlloc'd memory (target 0.9);
 *   quantized experts (FP8 on the DeepSeek-V3 shape; INT8, INT4, MXFP4 on
 *     the Mixtral shape): decode in bytes as stored (values and scales) per
 *     second against the same copy, and one prefill size, fp32 and bf16
 *     tensor cores (precision exact and bf16), against the bf16 cuBLAS GEMM.
 * Layers: Mixtral-shaped (8 experts, top-2, 4096 x 14336) and DeepSeek-V3-
 * shaped (256 experts, top-8, 7168 x 2048, one shared expert), bf16, random
 * weights and uniform random routing.  --quick: small shapes, one
 * repetition (a smoke test of the benchmark).  Skips (77) without a GPU.
 */
#include "backend.h"
#include "common.h"
#include "cuda_probe.h"
#include "moe_cuda.h"
#include "quant.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct shape {
    const char *name;
    int E, K, H, F, shared;
};

static bool quick;
static int reps = 10;

static uint64_t rng(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Random bf16 in about [-0.03, 0.03], repeated from a 16 MiB pattern. */
static int fill_bf16(struct moe_backend *b, uint8_t *dst, size_t bytes)
{
    static uint16_t *pat;
    const size_t pn = 8u << 20;
    uint64_t s = 1;

    if (!pat) {
        pat = malloc(pn * 2);
        if (!pat)
            return -ENOMEM;
        for (size_t i = 0; i < pn; i++)
            pat[i] = (uint16_t)(0x3c00 + (rng(&s) & 0x00ff)) | (uint16_t)((rng(&s) & 1) << 15);
    }
    for (size_t off = 0; off < bytes; off += pn * 2) {
        int r = b->ops->copy_in(b, dst + off, pat, MOE_MIN(pn * 2, bytes - off));

        if (r < 0)
            return r;
    }
    return 0;
}

struct layer {
    struct shape s;
    uint8_t **buf;                /* [E + shared] gate|up|down (and their scales) */
    struct moe_expert_weights *w; /* [E + shared] */
    size_t expert_bytes;
};

/* A layer of s's shape, bf16 (q NONE) or quantized to q with scale block
 * brows x bcols (random values, scales of one byte pattern). */
static int layer_make(struct moe_backend *b, const struct shape *s, enum moe_quant q, int brows,
                      int bcols, struct layer *L)
{
    const int n = s->E + s->shared;
    const struct moe_quant_fmt f = {q, brows, bcols};
    const size_t m = q ? moe_quant_data_bytes(q, s->F, s->H) : (size_t)s->F * s->H * 2;
    const size_t sb = q ? moe_quant_scale_bytes(&f, s->F, s->H) : 0;
    const size_t at = (m + 255) & ~(size_t)255, sat = (sb + 255) & ~(size_t)255;

    memset(L, 0, sizeof(*L));
    L->s = *s;
    L->expert_bytes = 3 * (m + sb);
    L->buf = calloc((size_t)n, sizeof(*L->buf));
    L->w = calloc((size_t)n, sizeof(*L->w));
    if (!L->buf || !L->w)
        return -ENOMEM;
    for (int e = 0; e < n; e++) {
        L->buf[e] = b->ops->alloc(b, 3 * at + 3 * sat);
        if (!L->buf[e] || fill_bf16(b, L->buf[e], 3 * at) < 0)
            return -ENOMEM;
        L->w[e] = (struct moe_expert_weights){.dtype = MOE_DTYPE_BF16,
                                              .hidden = s->H,
                                              .ffn = s->F,
                                              .gate = L->buf[e],
                                              .up = L->buf[e] + at,
                                              .down = L->buf[e] + 2 * at};
        if (q) {
            uint8_t *sc = L->buf[e] + 3 * at;

            /* 0x3c: F32 scales near 0.0115, e8m0 2^-67 (finite) */
            if (cudaMemset(sc, 0x3c, 3 * sat) != cudaSuccess)
                return -ENOMEM;
            L->w[e].dtype = moe_quant_value_dtype(q);
            L->w[e].quant = f;
            L->w[e].gate_s = sc;
            L->w[e].up_s = sc + sat;
            L->w[e].down_s = sc + 2 * sat;
        }
    }
    return 0;
}

static void layer_free(struct moe_backend *b, struct layer *L)
{
    for (int e = 0; L->buf && e < L->s.E + L->s.shared; e++)
        b->ops->mem_free(b, L->buf[e]);
    free(L->buf);
    free(L->w);
}

/* Uniform random top-k routing of T tokens, grouped by expert as the
 * engine does; returns the work items and the distinct experts used. */
static int route(const struct layer *L, int T, uint64_t *seed, struct moe_ffn_work *work,
                 int32_t *tok, float *scl, int32_t *all)
{
    const int E = L->s.E, K = L->s.K;
    int32_t *cnt = calloc((size_t)E + 1, sizeof(*cnt)), *ids = malloc((size_t)T * K * 4);
    int n = 0;

    for (int t = 0; t < T; t++) {
        for (int j = 0; j < K; j++) {
            int e, dup;

            do {
                e = (int)(rng(seed) % (uint64_t)E);
                dup = 0;
                for (int i = 0; i < j; i++)
                    dup |= ids[t * K + i] == e;
            } while (dup);
            ids[t * K + j] = e;
            cnt[e + 1]++;
        }
    }
    for (int e = 0; e < E; e++)
        cnt[e + 1] += cnt[e];
    for (int e = 0; e < E; e++) {
        int at = cnt[e];

        for (int i = 0; i < T * K; i++) {
            if (ids[i] == e) {
                tok[at] = i / K;
                scl[at++] = 1.0f / K;
            }
        }
        if (at > cnt[e]) {
            work[n] = (struct moe_ffn_work){.w = &L->w[e],
                                            .n_tokens = at - cnt[e],
                                            .tokens = tok + cnt[e],
                                            .scales = scl + cnt[e]};
            n++;
        }
    }
    if (L->s.shared) {
        for (int t = 0; t < T; t++)
            all[t] = t;
        work[n] = (struct moe_ffn_work){
            .w = &L->w[E], .n_tokens = T, .tokens = all, .scales = scl + (size_t)T * K};
        for (int t = 0; t < T; t++)
            scl[(size_t)T * K + t] = 1.0f;
        n++;
    }
    free(cnt);
    free(ids);
    return n;
}

static double ffn_seconds(struct moe_backend *b, const struct layer *L, int T,
                          enum moe_compute_precision prec, int *ret_items)
{
    struct moe_ffn_work *work = calloc((size_t)L->s.E + 1, sizeof(*work));
    int32_t *tok = malloc((size_t)T * L->s.K * 4), *all = malloc((size_t)T * 4);
    float *scl = malloc(((size_t)T * L->s.K + T) * 4);
    float *x = b->ops->alloc(b, (size_t)T * L->s.H * 4),
          *out = b->ops->alloc(b, (size_t)T * L->s.H * 4);
    float *hx = malloc((size_t)T * L->s.H * 4);
    uint64_t seed = 99, t0;
    double best = 1e30;
    int n;

    if (!work || !tok || !all || !scl || !x || !out || !hx) {
        fprintf(stderr, "out of memory for %d tokens\n", T);
        exit(1);
    }
    for (size_t i = 0; i < (size_t)T * L->s.H; i++)
        hx[i] = (float)((int)(rng(&seed) % 2001) - 1000) / 1000.0f;
    b->ops->copy_in(b, x, hx, (size_t)T * L->s.H * 4);
    b->ops->copy_in(b, out, hx, (size_t)T * L->s.H * 4);
    n = route(L, T, &seed, work, tok, scl, all);
    for (int i = 0; i < n; i++)
        work[i].precision = prec;
    /* Warm up (scratch, cuBLAS heuristics), then the best of reps. */
    if (b->ops->grouped_ffn(b, x, L->s.H, T, work, n, out) < 0) {
        fprintf(stderr, "grouped_ffn failed: %s\n", moe_backend_cuda_last_error(b));
        exit(1);
    }
    for (int r = 0; r < reps; r++) {
        t0 = moe_now_ns();
        b->ops->grouped_ffn(b, x, L->s.H, T, work, n, out);
        best = MOE_MIN(best, (double)(moe_now_ns() - t0) * 1e-9);
    }
    *ret_items = n;
    b->ops->mem_free(b, x);
    b->ops->mem_free(b, out);
    free(work);
    free(tok);
    free(all);
    free(scl);
    free(hx);
    return best;
}

/* Bytes per second of a device-to-device copy (read + write). */
static double d2d_bandwidth(size_t bytes)
{
    void *a = NULL, *c = NULL;
    cudaEvent_t e0, e1;
    float ms, best = 1e30f;

    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&c, bytes) != cudaSuccess)
        return 0;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaMemcpy(c, a, bytes, cudaMemcpyDeviceToDevice);
    for (int r = 0; r < reps; r++) {
        cudaEventRecord(e0, 0);
        cudaMemcpy(c, a, bytes, cudaMemcpyDeviceToDevice);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        cudaEventElapsedTime(&ms, e0, e1);
        best = ms < best ? ms : best;
    }
    cudaFree(a);
    cudaFree(c);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return 2.0 * (double)bytes / (best * 1e-3);
}

/* FLOP/s of one bf16 GEMM [m, k] x [k, n], fp32 accumulation. */
static double gemm_flops(int m, int n, int k)
{
    cublasHandle_t h;
    void *A = NULL, *B = NULL, *C = NULL;
    const float one = 1.0f, zero = 0.0f;
    cudaEvent_t e0, e1;
    float ms, best = 1e30f;

    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS)
        return 0;
    if (cudaMalloc(&A, (size_t)m * k * 2) != cudaSuccess ||
        cudaMalloc(&B, (size_t)k * n * 2) != cudaSuccess ||
        cudaMalloc(&C, (size_t)m * n * 4) != cudaSuccess)
        return 0;
    cudaMemset(A, 0x3c, (size_t)m * k * 2);
    cudaMemset(B, 0x3c, (size_t)k * n * 2);
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int r = 0; r <= reps; r++) {
        cudaEventRecord(e0, 0);
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, A, CUDA_R_16BF, k, B, CUDA_R_16BF,
                     k, &zero, C, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        cudaEventElapsedTime(&ms, e0, e1);
        if (r > 0)
            best = ms < best ? ms : best;
    }
    cudaFree(A);
    cudaFree(B);
    cudaFree(C);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cublasDestroy(h);
    return 2.0 * m * (double)n * k / (best * 1e-3);
}

static void report(const char *what, double fig, const char *unit, double limit, double target)
{
    double ratio = limit > 0 ? fig / limit : 0;

    printf("%-44s %9.3f %-7s limit %9.3f  ratio %.2f (target %.1f)%s\n", what, fig, unit, limit,
           ratio, target, ratio >= target ? "" : "  BELOW TARGET");
}

/* The layer of s in q (MOE_QUANT_NONE: bf16); name says which. */
static void bench_shape(struct moe_backend *b, const struct shape *s, enum moe_quant q, int brows,
                        int bcols, double d2d)
{
    static const int decode_t[] = {1, 8, 64}, prefill_t[] = {512, 4096};
    struct layer L;
    char what[160], name[128];
    int items;

    snprintf(name, sizeof(name), "%s%s%s", s->name, q ? " " : "", q ? moe_quant_name(q) : "");
    if (layer_make(b, s, q, brows, bcols, &L) < 0) {
        printf("%s: not enough device memory for the layer, skipped\n", name);
        layer_free(b, &L);
        return;
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(decode_t); i++) {
        const int T = decode_t[i];
        double sec = ffn_seconds(b, &L, T, MOE_PRECISION_EXACT, &items);
        /* Distinct experts read: the work items (shared included). */
        double bytes = (double)items * (double)L.expert_bytes;

        snprintf(what, sizeof(what), "%s decode %d tok (%d experts)", name, T, items);
        report(what, bytes / sec * 1e-12, "TB/s", d2d * 1e-12, 0.7);
    }
    /* quantized: one prefill size, the tiled kernel in fp32 (precision
     * exact) and on bf16 tensor cores (precision bf16), against bf16 cuBLAS */
    for (size_t i = 0; i < (q ? 2 : MOE_ARRAY_SIZE(prefill_t)); i++) {
        const int T = quick ? prefill_t[q ? 0 : i] / 8 : prefill_t[q ? 0 : i];
        const bool bf = q && i == 1;
        double sec = ffn_seconds(b, &L, T, bf ? MOE_PRECISION_BF16 : MOE_PRECISION_EXACT, &items);
        double rows = (double)T * s->K + (double)T * s->shared;
        double flops = 2.0 * 3.0 * (double)s->H * s->F * rows;
        double lim = gemm_flops(3 * s->F, (int)rows, s->H);

        snprintf(what, sizeof(what), "%s prefill %d tok%s", name, T,
                 !q   ? ""
                 : bf ? " (bf16 mma)"
                      : " (fp32)");
        report(what, flops / sec * 1e-12, "TFLOP/s", lim * 1e-12, 0.8);
    }
    layer_free(b, &L);
}

static void bench_page_in(size_t bytes)
{
    struct moe_tier *t;
    struct moe_error err = {0};
    void *host = NULL, *pinned = NULL, *dst, *dev = NULL;
    cudaStream_t st;
    double best_t = 1e30, best_c = 1e30;
    uint64_t t0;

    if (moe_tier_cuda_create(0, bytes, &t, &err) < 0) {
        printf("page-in: %s, skipped\n", err.msg);
        return;
    }
    dst = t->ops->alloc(t, (bytes + MOE_TIER_ALIGN - 1) & ~(uint64_t)(MOE_TIER_ALIGN - 1));
    host = moe_alloc_aligned(bytes);
    if (!dst || !host || moe_cuda_host_register(host, bytes, &err) < 0 ||
        cudaHostAlloc(&pinned, bytes, cudaHostAllocDefault) != cudaSuccess ||
        cudaMalloc(&dev, bytes) != cudaSuccess) {
        printf("page-in: setup failed (%s), skipped\n", err.msg);
        return;
    }
    memset(host, 1, bytes);
    memset(pinned, 1, bytes);
    cudaStreamCreate(&st);
    for (int r = 0; r <= reps; r++) {
        t0 = moe_now_ns();
        t->ops->upload(t, dst, host, bytes);
        if (r > 0)
            best_t = MOE_MIN(best_t, (double)(moe_now_ns() - t0) * 1e-9);
        t0 = moe_now_ns();
        cudaMemcpyAsync(dev, pinned, bytes, cudaMemcpyHostToDevice, st);
        cudaStreamSynchronize(st);
        if (r > 0)
            best_c = MOE_MIN(best_c, (double)(moe_now_ns() - t0) * 1e-9);
    }
    report("page-in host -> GPU tier", (double)bytes / best_t * 1e-9, "GB/s",
           (double)bytes / best_c * 1e-9, 0.9);
    cudaStreamDestroy(st);
    cudaFree(dev);
    cudaFreeHost(pinned);
    moe_cuda_host_unregister(host);
    moe_free_aligned(host);
    moe_tier_destroy(t);
}

int main(int argc, char **argv)
{
    static const struct shape full[] = {
        {"mixtral 8x top-2 4096x14336", 8, 2, 4096, 14336, 0},
        {"deepseek-v3 256x top-8 7168x2048 +1", 256, 8, 7168, 2048, 1},
    };
    static const struct shape small[] = {
        {"mixtral-like (quick) 8x top-2 1024x3584", 8, 2, 1024, 3584, 0},
        {"deepseek-like (quick) 32x top-8 1024x512 +1", 32, 8, 1024, 512, 1},
    };
    struct moe_cuda_config cfg = {0};
    struct moe_backend *b;
    struct moe_error err = {0};
    char msg[256];
    double d2d;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            quick = true;
            reps = 1;
        } else {
            fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
            return 2;
        }
    }
    if (moe_cuda_probe(msg, sizeof(msg)) <= 0) {
        printf("%s\nSKIP: no CUDA device on this machine; the GPU benchmark needs one\n", msg);
        return 77;
    }
    printf("%s\n", msg);
    if (moe_backend_cuda_init(&cfg, &b, &err) < 0) {
        fprintf(stderr, "CUDA backend: %s\n", err.msg);
        return 1;
    }
    d2d = d2d_bandwidth(quick ? 64u << 20 : 1u << 30);
    printf("device-to-device copy: %.3f TB/s (read + write)\n", d2d * 1e-12);
    for (size_t i = 0; i < 2; i++)
        bench_shape(b, quick ? &small[i] : &full[i], MOE_QUANT_NONE, 0, 0, d2d);
    /* Quantized experts: FP8 as DeepSeek-V3 publishes it (128 x 128 blocks),
     * the int8 / int4 of moectl pack --quantize, MXFP4 as gpt-oss. */
    bench_shape(b, quick ? &small[1] : &full[1], MOE_QUANT_FP8, 128, 128, d2d);
    bench_shape(b, quick ? &small[0] : &full[0], MOE_QUANT_INT8, 1, 128, d2d);
    bench_shape(b, quick ? &small[0] : &full[0], MOE_QUANT_INT4, 1, 32, d2d);
    bench_shape(b, quick ? &small[0] : &full[0], MOE_QUANT_MXFP4, 1, 32, d2d);
    bench_page_in(quick ? 16u << 20 : (size_t)3 * 4096 * 14336 * 2);
    moe_backend_free(b);
    return 0;
}
