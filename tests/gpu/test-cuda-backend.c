/*
 * The CUDA backend (kernels/backend_cuda.cu, tier_cuda.cu) against the CPU
 * backend and an fp64 reference computed here, on generated checkpoints of
 * every architecture: token counts 1 to 4096, the decode kernels and the
 * cuBLAS path each forced and chosen by size, a scratch cap small enough to
 * cut batches into pieces, and a GPU cache tier too small for the model
 * (page-ins during a batch).  Also: the GPU tier's blocks and uploads from
 * registered host memory, and device out-of-memory failing a forward with
 * an error (and the next forward working).  Skips (77) without a CUDA
 * device.
 */
#include "backend.h"
#include "cache.h"
#include "cuda_probe.h"
#include "dtype.h"
#include "genmodel.h"
#include "layer.h"
#include "model.h"
#include "moe_cuda.h"
#include "router.h"
#include "layer_ref.h"
#include "tests.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>

/* The GPU engines under test: name, config. */
static const struct {
    const char *name;
    int decode_max;
    uint64_t scratch;
} variants[] = {
    {"auto", 0, 0},
    {"cublas-only", -1, 0},
    {"decode-64", 64, 0},
    {"small-scratch", 0, 256 << 10},
};

#define N_VARIANTS (int)MOE_ARRAY_SIZE(variants)

static const int token_counts[] = {1, 2, 7, 64, 511, 4096};

static double rel_l2(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;

    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];

        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Relative L2 tolerance against fp64 for a weight dtype: the cuBLAS path
 * rounds activations to it. */
static double tolerance(enum moe_dtype t)
{
    return t == MOE_DTYPE_BF16 ? 2e-2 : t == MOE_DTYPE_F16 ? 4e-3 : 1e-4;
}

struct model_case {
    enum moe_arch arch;
    enum moe_dtype dtype;
    int hidden, ffn;
};

static const struct model_case models[] = {
    {MOE_ARCH_MIXTRAL, MOE_DTYPE_BF16, 64, 48},
    {MOE_ARCH_QWEN2_MOE, MOE_DTYPE_BF16, 64, 48},
    {MOE_ARCH_QWEN3_MOE, MOE_DTYPE_BF16, 64, 48},
    {MOE_ARCH_OLMOE, MOE_DTYPE_BF16, 64, 48},
    {MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_BF16, 64, 48},
    {MOE_ARCH_MIXTRAL, MOE_DTYPE_F16, 64, 48},
    {MOE_ARCH_MIXTRAL, MOE_DTYPE_F32, 64, 48},
    {MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_F32, 64, 48},
    /* Rows not a multiple of 8 elements: the scalar fallback of the decode kernels. */
    {MOE_ARCH_QWEN2_MOE, MOE_DTYPE_BF16, 36, 20},
    /* gpt-oss: router and expert biases, the clamped SwiGLU. */
    {MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, 64, 48},
    {MOE_ARCH_GPT_OSS, MOE_DTYPE_F32, 64, 48},
    {MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, 36, 20},
};

static struct moe_engine *gpu_cache_engine(struct moe_model *m, struct moe_backend *gpu,
                                           struct moe_cache **ret_cache)
{
    uint64_t slot = m->expert_bytes + 6 * 4096;
    struct moe_cache_config cc = {.policy = MOE_POLICY_LRU, .host_bytes = 4 * slot};
    struct moe_cache *cache;
    struct moe_tier *tier;
    struct moe_engine *e;
    struct moe_error err = {0};
    int model;

    if (moe_cache_create(&cc, &cache, &err) != 0)
        FAIL("cache: %s", err.msg);
    /* Room for 3 experts on the GPU, 4 in host memory: most batches page. */
    if (moe_tier_cuda_create(0, 3 * slot, &tier, &err) != 0)
        FAIL("GPU tier: %s", err.msg);
    ASSERT_STREQ(tier->name, "cuda:0");
    ASSERT_STREQ(tier->ops->kind, "cuda");
    ASSERT_TRUE(!tier->host_memory);
    if (moe_cache_push_tier(cache, tier, &err) != 0)
        FAIL("push tier: %s", err.msg);
    ASSERT_EQ(moe_cache_tier_count(cache), 2);
    if (moe_cache_add_model(cache, m, NULL, &model, &err) != 0)
        FAIL("add model: %s", err.msg);
    ASSERT_EQ(moe_engine_attach(m, gpu, cache, model, &e), 0);
    *ret_cache = cache;
    return e;
}

static void check_model(const struct model_case *mc)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *dir = test_tmpdir("cuda");
    struct moe_model *m;
    struct moe_backend *cpu, *gpu[N_VARIANTS];
    struct moe_engine *ecpu, *egpu[N_VARIANTS], *ecache;
    struct moe_cache *cache;
    struct moe_cpu_config ccfg = {0};
    const int Tmax = 4096;
    uint64_t seed = 11;

    moe_genmodel_defaults(mc->arch, &o);
    o.out_dir = dir;
    o.hidden = mc->hidden;
    o.ffn = mc->ffn;
    o.dtype = mc->dtype;
    o.n_layers = 2;
    o.seed = 3;
    if (moe_genmodel_write(&o, &err) != 0)
        FAIL("gen-model: %s", err.msg);
    if (mc->arch == MOE_ARCH_GPT_OSS) {
        /* A limit the gate and up values cross often, as test-layer. */
        char *path = NULL;
        json_t *c;

        ASSERT_TRUE(asprintf(&path, "%s/config.json", dir) > 0);
        c = json_load_file(path, 0, NULL);
        ASSERT_TRUE(c);
        json_object_set_new(c, "swiglu_limit", json_real(0.75));
        json_object_set_new(c, "swiglu_alpha", json_real(1.3));
        ASSERT_EQ(json_dump_file(c, path, 0), 0);
        json_decref(c);
        free(path);
    }
    ASSERT_EQ(moe_model_open(dir, &m, &err), 0);
    ASSERT_EQ(moe_backend_cpu_init(&ccfg, &cpu, NULL), 0);
    ASSERT_EQ(moe_engine_init(m, cpu, &ecpu), 0);
    for (int v = 0; v < N_VARIANTS; v++) {
        struct moe_cuda_config cfg = {.device = 0,
                                      .decode_max_tokens = variants[v].decode_max,
                                      .scratch_bytes = variants[v].scratch};

        if (moe_backend_cuda_init(&cfg, &gpu[v], &err) != 0)
            FAIL("CUDA backend: %s", err.msg);
        ASSERT_STREQ(gpu[v]->ops->name, "cuda");
        ASSERT_TRUE(!gpu[v]->ops->host_memory);
        ASSERT_EQ(moe_backend_cuda_device(gpu[v]), 0);
        ASSERT_EQ(moe_engine_init(m, gpu[v], &egpu[v]), 0);
    }
    ecache = gpu_cache_engine(m, gpu[0], &cache);

    const int H = m->cfg.hidden, K = m->cfg.top_k;
    const size_t xn = (size_t)Tmax * H;
    float *x = malloc(xn * sizeof(float)), *ycpu = malloc(xn * sizeof(float));
    float *ygpu = malloc(xn * sizeof(float)), *y2 = malloc(xn * sizeof(float));
    float *w = malloc((size_t)Tmax * K * sizeof(float));
    float *wg = malloc((size_t)Tmax * K * sizeof(float));
    int32_t *ids = malloc((size_t)Tmax * K * sizeof(int32_t));
    int32_t *idg = malloc((size_t)Tmax * K * sizeof(int32_t));
    double *ref = malloc(xn * sizeof(double));

    ASSERT_TRUE(x && ycpu && ygpu && y2 && w && wg && ids && idg && ref);
    for (size_t i = 0; i < xn; i++)
        x[i] = 2.0f * test_rand_f32(&seed);
    for (int layer = 0; layer < m->cfg.n_layers; layer++) {
        if (!m->layers[layer].is_moe)
            continue;
        for (size_t ti = 0; ti < MOE_ARRAY_SIZE(token_counts); ti++) {
            const int T = token_counts[ti];
            const size_t n = (size_t)T * H;
            int same = 0;

            ASSERT_EQ(moe_layer_forward(ecpu, layer, x, T, NULL, NULL, ycpu, ids, w, NULL, &err),
                      0);
            layer_ref(m, layer, x, T, ids, w, ref);
            double ecpu_ref = test_rel_l2_f32(ycpu, ref, n);

            /* The GPU router picks what the CPU router picks (up to near
             * ties in the logits, summed in another order). */
            if (moe_layer_forward(egpu[0], layer, x, T, NULL, NULL, ygpu, idg, wg, NULL, &err) != 0)
                FAIL("%s layer %d, %d tokens: %s", moe_arch_name(mc->arch), layer, T, err.msg);
            for (int t = 0; t < T; t++) {
                bool eq = memcmp(ids + t * K, idg + t * K, (size_t)K * sizeof(int32_t)) == 0;

                for (int j = 0; eq && j < K; j++)
                    eq = fabsf(w[t * K + j] - wg[t * K + j]) <= 1e-5f * fabsf(w[t * K + j]) + 1e-7f;
                same += eq;
            }
            if (same < T - T / 50 - 1)
                FAIL("%s layer %d: GPU routing differs from the CPU's for %d of %d tokens",
                     moe_arch_name(mc->arch), layer, T - same, T);

            /* Same routing as the CPU: every variant within tolerance of
             * the reference and of the CPU, and repeatable bit for bit. */
            for (int v = 0; v < N_VARIANTS; v++) {
                if (moe_layer_forward(egpu[v], layer, x, T, ids, w, ygpu, NULL, NULL, NULL, &err) !=
                    0)
                    FAIL("%s %s layer %d, %d tokens: %s", moe_arch_name(mc->arch), variants[v].name,
                         layer, T, err.msg);
                double eref = test_rel_l2_f32(ygpu, ref, n), ecpu_gpu = rel_l2(ygpu, ycpu, n);

                if (T == 1 || T == 4096 || v == 0)
                    printf("%s %s %s layer %d, %4d tokens: rel L2 vs fp64 %.2e (cpu %.2e), "
                           "vs cpu %.2e\n",
                           moe_arch_name(mc->arch), moe_dtype_user_name(mc->dtype),
                           variants[v].name, layer, T, eref, ecpu_ref, ecpu_gpu);
                if (!(eref < tolerance(mc->dtype)) || !(ecpu_gpu < tolerance(mc->dtype)))
                    FAIL("%s %s %s layer %d, %d tokens: rel L2 %.3e vs fp64, %.3e vs cpu; "
                         "tolerance %.1e",
                         moe_arch_name(mc->arch), moe_dtype_user_name(mc->dtype), variants[v].name,
                         layer, T, eref, ecpu_gpu, tolerance(mc->dtype));
                if (v == 0) {
                    ASSERT_EQ(
                        moe_layer_forward(egpu[0], layer, x, T, ids, w, y2, NULL, NULL, NULL, &err),
                        0);
                    ASSERT_TRUE(memcmp(ygpu, y2, n * sizeof(float)) == 0);
                }
            }
            /* Through a GPU tier too small for the batch: same answer (the
             * combine order does not depend on what was resident). */
            if (T <= 511) {
                struct moe_forward_stats st;

                ASSERT_EQ(
                    moe_layer_forward(egpu[0], layer, x, T, ids, w, ygpu, NULL, NULL, NULL, &err),
                    0);
                if (moe_layer_forward(ecache, layer, x, T, ids, w, y2, NULL, NULL, &st, &err) != 0)
                    FAIL("GPU tier, layer %d, %d tokens: %s", layer, T, err.msg);
                double d = rel_l2(y2, ygpu, n);

                if (T >= 64)
                    ASSERT_TRUE(st.misses > 0);
                if (!(d < 1e-6))
                    FAIL("GPU tier, layer %d, %d tokens: differs from resident by %.3e", layer, T,
                         d);
            }
        }
    }

    moe_engine_free(ecache);
    moe_cache_free(cache);
    moe_engine_free(ecpu);
    for (int v = 0; v < N_VARIANTS; v++) {
        moe_engine_free(egpu[v]);
        moe_backend_free(gpu[v]);
    }
    moe_backend_free(cpu);
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
    free(x);
    free(ycpu);
    free(ygpu);
    free(y2);
    free(w);
    free(wg);
    free(ids);
    free(idg);
    free(ref);
}

/* The GPU tier: blocks, uploads from registered host memory, limits. */
static void check_tier(void)
{
    struct moe_tier *t;
    struct moe_backend *gpu;
    struct moe_cuda_config cfg = {0};
    struct moe_error err = {0};
    const uint64_t cap = 16u << 20, blk = 4u << 20;
    uint8_t *host = moe_alloc_aligned(blk), *back = malloc(blk);
    void *b[4];

    ASSERT_TRUE(host && back);
    ASSERT_EQ(moe_backend_cuda_init(&cfg, &gpu, &err), 0);
    ASSERT_EQ(moe_tier_cuda_create(0, cap, &t, &err), 0);
    ASSERT_EQ(t->capacity, cap);
    ASSERT_EQ(moe_cuda_host_register(host, blk, &err), 0);
    for (size_t i = 0; i < blk; i++)
        host[i] = (uint8_t)(i * 7 + 3);
    for (int i = 0; i < 4; i++) {
        b[i] = t->ops->alloc(t, blk);
        ASSERT_TRUE(b[i] != NULL);
    }
    ASSERT_TRUE(t->ops->alloc(t, MOE_TIER_ALIGN) == NULL); /* full */
    ASSERT_EQ(t->ops->upload(t, b[2], host, blk), 0);
    ASSERT_EQ(gpu->ops->copy_out(gpu, back, b[2], blk), 0);
    ASSERT_TRUE(memcmp(host, back, blk) == 0);
    t->ops->free(t, b[1], blk);
    b[1] = t->ops->alloc(t, blk);
    ASSERT_TRUE(b[1] != NULL);
    ASSERT_EQ(t->ops->resize(t, 2 * cap), -ENOSPC);
    ASSERT_EQ(t->ops->resize(t, cap / 2), 0);
    for (int i = 0; i < 4; i++)
        t->ops->free(t, b[i], blk);
    ASSERT_TRUE(t->ops->alloc(t, cap / 2 + MOE_TIER_ALIGN) == NULL);
    moe_cuda_host_unregister(host);
    moe_tier_destroy(t);

    /* More than the device has: -ENOMEM with advice, never an abort. */
    ASSERT_EQ(moe_tier_cuda_create(0, 1ull << 50, &t, &err), -ENOMEM);
    ASSERT_CONTAINS(err.msg, "gpu_cache_bytes");
    ASSERT_EQ(moe_tier_cuda_create(99, cap, &t, &err), -ENODEV);
    ASSERT_TRUE(gpu->ops->alloc(gpu, (size_t)1 << 50) == NULL);
    moe_backend_free(gpu);
    moe_free_aligned(host);
    free(back);
    printf("GPU tier: ok\n");
}

/* Device memory exhausted: a forward fails with -ENOMEM and a message; once
 * memory is back, forwards work again. */
static void check_oom(void)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *dir = test_tmpdir("cuda-oom");
    struct moe_model *m;
    struct moe_backend *gpu;
    struct moe_engine *e;
    struct moe_cuda_config cfg = {0};
    void *hog[4096];
    int n_hog = 0, T = 4096, r;
    uint64_t seed = 3;

    moe_genmodel_defaults(MOE_ARCH_MIXTRAL, &o);
    o.out_dir = dir;
    o.hidden = 256;
    o.ffn = 128;
    o.n_layers = 1;
    if (moe_genmodel_write(&o, &err) != 0)
        FAIL("gen-model: %s", err.msg);
    ASSERT_EQ(moe_model_open(dir, &m, &err), 0);
    ASSERT_EQ(moe_backend_cuda_init(&cfg, &gpu, &err), 0);
    ASSERT_EQ(moe_engine_init(m, gpu, &e), 0);
    float *x = malloc((size_t)T * 256 * sizeof(float)), *y = malloc((size_t)T * 256 * 4);

    ASSERT_TRUE(x && y);
    for (int i = 0; i < T * 256; i++)
        x[i] = test_rand_f32(&seed);
    ASSERT_EQ(moe_layer_forward(e, 0, x, T, NULL, NULL, y, NULL, NULL, NULL, &err), 0);
    /* Take all device memory, 256 MiB at a time, then 1 MiB. */
    for (size_t sz = 256u << 20; sz >= (1u << 20) && n_hog < 4096; sz /= 16) {
        while (n_hog < 4096 && (hog[n_hog] = gpu->ops->alloc(gpu, sz)) != NULL)
            n_hog++;
    }
    r = moe_layer_forward(e, 0, x, T, NULL, NULL, y, NULL, NULL, NULL, &err);
    printf("forward with the device full: %d (%s)\n", r, err.msg);
    ASSERT_EQ(r, -ENOMEM);
    ASSERT_CONTAINS(err.msg, "cuda");
    while (n_hog > 0)
        gpu->ops->mem_free(gpu, hog[--n_hog]);
    ASSERT_EQ(moe_layer_forward(e, 0, x, T, NULL, NULL, y, NULL, NULL, NULL, &err), 0);
    moe_engine_free(e);
    moe_backend_free(gpu);
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
    free(x);
    free(y);
}

int main(void)
{
    char msg[256];
    int n = moe_cuda_probe(msg, sizeof(msg));

    printf("%s\n", msg);
    if (n <= 0) {
        printf("SKIP: no CUDA device on this machine; the CUDA backend tests need one\n");
        return TEST_SKIP;
    }
    check_tier();
    for (size_t i = 0; i < MOE_ARRAY_SIZE(models); i++)
        check_model(&models[i]);
    check_oom();
    printf("ok\n");
    return 0;
}
