/*
 * Synthetic checkpoints (moectl gen-model): owns the family layouts (which
 * tensors, in which order, with which shapes), the config.json keys of each
 * family, the deterministic weights and the split into shards.
 *
 * Determinism: every tensor's values come from (seed, tensor name) alone:
 * the name is hashed into the seed of a xoshiro256** generator, values are
 * produced two per 64-bit draw in element order, so neither sharding, the
 * order of tensors in a file nor the chunking of writes changes a byte.
 *
 * Values are scaled uniform noise (std s is uniform on [-s*sqrt(3),
 * s*sqrt(3)]): expert gate/up rows 1/sqrt(hidden), down rows 1/sqrt(ffn), so
 * that an expert maps N(0,1) inputs to outputs of std ~0.5; norms are 1;
 * embeddings and attention 0.02; biases uniform in [-0.05, 0.05].
 *
 * Router rows are skewed: a random permutation ranks the experts; ranks 2j
 * and 2j+1 form a pair of popularity p_j = 1/(j+1)^1.5 whose rows share a
 * component with opposite signs (correlation -0.95), each row scaled by
 * 0.075 + 1.5*p_j.  For zero-mean inputs an expert's selection rate depends
 * only on the variance of its logit and how it correlates with the others:
 * the gain makes popular experts win often, and an opposed pair covers both
 * signs of its direction, so one of the two is nearly always chosen.  With
 * N(0,1) inputs the most popular expert is chosen 4-100x as often as the
 * least (more with more experts).  Only the ratio of gains matters for the
 * top-k; the overall scale keeps logits within a few units, as in real
 * routers, so that softmax weights are not needlessly sharp and fp32 logits
 * stay accurate.
 *
 * Files: config.json (keys sorted, as transformers writes it), then
 * model.safetensors, or model-0000i-of-0000N.safetensors split in model
 * order into parts of about equal bytes plus model.safetensors.index.json.
 * Within a file tensors are ordered as the reference writer orders them:
 * wider dtypes first, then by name.
 */
#include "genmodel.h"
#include "st_writer.h"
#include "dtype.h"
#include "quant.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define GEN_VOCAB 512
#define GEN_MAX_TENSORS (1u << 20)
#define GEN_MAX_SHARDS 99999
#define GEN_MAX_SHARED 64
#define GEN_CHUNK (1u << 20) /* elements generated per step (even) */
#define GEN_NAME_MAX 96

/* Router skew (see the top of the file). */
#define ROUTER_ZIPF_A 1.5
#define ROUTER_GAIN_LO 0.075
#define ROUTER_GAIN_HI 1.5
#define ROUTER_PAIR_RHO 0.95

/* DeepSeek MLA ranks (small versions of V3's 1536/512/64/128/128). */
#define DS_HEADS 4
#define DS_Q_LORA 64
#define DS_KV_LORA 32
#define DS_ROPE_DIM 16
#define DS_NOPE_DIM 32
#define DS_V_DIM 32

enum init_kind {
    INIT_NOISE = 0, /* uniform noise of std scale */
    INIT_ONES,      /* every element 1.0 */
    INIT_UNIFORM,   /* uniform in [-scale, scale] */
    INIT_ROUTER,    /* skewed router rows, [E, H] */
    INIT_FP8,       /* INIT_NOISE's values divided by their block's scale, as e4m3 */
    INIT_FP8_SCALE, /* the block scales (weight_scale_inv) of the INIT_FP8 tensor
                     * named key_name, [ceil(rows / 128), ceil(cols / 128)] */
};

/* FP8 block size (quantization_config weight_block_size), as published. */
#define GEN_FP8_BLOCK 128

/* What a fused expert tensor holds (transformers 5's layout). */
enum fuse_kind {
    FUSE_NONE = 0,
    FUSE_GATE_UP, /* gate_up_proj [E, 2F, H]: per expert its gate rows, then its up rows */
    FUSE_DOWN,    /* down_proj [E, H, F] */
    /* Llama 4's, transposed: gate_up_proj [E, H, 2F] (each row: the gate
     * column, then the up column) and down_proj [E, F, H]. */
    FUSE_GATE_UP_T,
    FUSE_DOWN_T,
    /* gpt-oss's: as FUSE_GATE_UP_T, but each row interleaves gate and up
     * (gate column f at 2f, up column f at 2f + 1); its down is FUSE_DOWN_T. */
    FUSE_GATE_UP_TI,
    /* gpt-oss's MXFP4 experts as released (U8): gate_up_proj_blocks
     * [E, 2F, H / 32, 16] (row 2f: gate[f], row 2f + 1: up[f], each the
     * e2m1 values of moe_quant_mxfp4_row, two per byte) and its scales
     * [E, 2F, H / 32] (e8m0); down_proj_blocks [E, H, F / 32, 16] (row h:
     * down[h]) and its scales [E, H, F / 32].  The values are those of the
     * bf16 layout, quantized. */
    FUSE_MX_GATE_UP,
    FUSE_MX_GATE_UP_S,
    FUSE_MX_DOWN,
    FUSE_MX_DOWN_S,
};

/* One tensor of the checkpoint. */
struct gtensor {
    char name[GEN_NAME_MAX];
    /* The name its values are keyed by: name, or the name the per-expert
     * layout gives the same tensor (a fused layout's router and experts get
     * the values of the per-expert one, byte for byte). */
    char key_name[GEN_NAME_MAX];
    enum moe_dtype dtype;
    enum init_kind init;
    float scale; /* std (NOISE) or half-width (UNIFORM) */
    int ndim;    /* 1, 2, 3 (fused experts) or 4 (MXFP4 blocks) */
    int64_t shape[4];
    enum fuse_kind fuse; /* fused: values are those of the per-expert tensors */
    int layer;           /* fused: its layer */
    int64_t rows, cols;  /* INIT_FP8, INIT_FP8_SCALE: the weight's shape */
    uint64_t count;      /* elements */
    uint64_t nbytes;
    int shard; /* 0-based file index */
};

/* The resolved shape of the model. */
struct gdims {
    enum moe_arch arch;
    enum moe_dtype dtype;
    int L, E, K, H, F;
    int n_shared;                /* deepseek: count; qwen2_moe: 0 or 1 */
    int shared_ffn;              /* rows of the (fused) shared expert; 0 when none */
    int dense_ffn;               /* intermediate_size of dense MLPs */
    int first_dense;             /* deepseek first_k_dense_replace */
    int moe_step;                /* llama4 interleave_moe_layer_step; 1 elsewhere */
    int n_group, topk_group;     /* deepseek */
    int n_heads, n_kv, head_dim; /* attention (deepseek: MLA heads) */
    bool fused;                  /* routed experts in the fused layout */
    bool multimodal;             /* qwen3_5_moe: the released config (text_config) */
    const char *lp;              /* prefix of layer i's tensors, before "<i>." */
    const char *mp;              /* prefix of embed_tokens and norm */
    int n_shards;
    uint64_t seed;
    bool fp8; /* linear weights as FP8 e4m3 + weight_scale_inv (DeepSeek-V3's layout) */
    bool mxfp4; /* gpt_oss: the routed experts in MXFP4, as released */
};

struct gplan {
    struct gdims d;
    size_t n, cap;
    struct gtensor *t; /* [n], model order */
    uint64_t total_bytes;
};

/* ---- deterministic values ------------------------------------------------ */

struct xoshiro {
    uint64_t s[4];
};

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t fnv1a64(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;

    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ull;
    }
    return h;
}

/* A generator for (key, tag, index): tensor streams use tag 0. */
static void xo_seed(struct xoshiro *g, uint64_t key, uint64_t tag, uint64_t index)
{
    uint64_t x = key ^ (tag * 0xd1b54a32d192ed03ull) ^ (index * 0x8cb92ba72f3d8dd7ull);

    for (int i = 0; i < 4; i++)
        g->s[i] = splitmix64(&x);
}

static inline uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t xo_next(uint64_t *s)
{
    uint64_t r = rotl64(s[1] * 5, 7) * 9, t = s[1] << 17;

    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return r;
}

/* The key of a tensor's values. */
static uint64_t tensor_key(uint64_t seed, const char *name)
{
    uint64_t x = seed;

    return splitmix64(&x) ^ fnv1a64(name);
}

/*
 * n values uniform on [-a, a] (symmetric: 24-bit integers centred on 0),
 * two per draw.  n must be even except for the last call on a stream.
 */
static void fill_uniform(struct xoshiro *g, float *out, size_t n, float a)
{
    uint64_t s[4] = {g->s[0], g->s[1], g->s[2], g->s[3]};
    const float k = a * 0x1p-23f;
    size_t i;

    for (i = 0; i + 1 < n; i += 2) {
        uint64_t r = xo_next(s);

        out[i] = ((float)(uint32_t)(r >> 40) - 8388607.5f) * k;
        out[i + 1] = ((float)(uint32_t)((r >> 8) & 0xffffffu) - 8388607.5f) * k;
    }
    if (i < n)
        out[i] = ((float)(uint32_t)(xo_next(s) >> 40) - 8388607.5f) * k;
    memcpy(g->s, s, sizeof(s));
}

/* State of one router tensor: the rank of every expert. */
struct router_gen {
    int E, H;
    uint64_t key;
    int *rank;  /* [E] */
    float *tmp; /* [H] */
};

static int router_gen_init(struct router_gen *rg, const struct gtensor *t, uint64_t key)
{
    struct xoshiro g;
    int *perm;

    rg->E = (int)t->shape[0];
    rg->H = (int)t->shape[1];
    rg->key = key;
    rg->rank = malloc((size_t)rg->E * sizeof(int));
    rg->tmp = malloc((size_t)rg->H * sizeof(float));
    perm = malloc((size_t)rg->E * sizeof(int));
    if (!rg->rank || !rg->tmp || !perm) {
        free(perm);
        return -ENOMEM;
    }
    /* Fisher-Yates: perm[r] is the expert of rank r. */
    xo_seed(&g, key, 1, 0);
    for (int i = 0; i < rg->E; i++)
        perm[i] = i;
    for (int i = rg->E - 1; i > 0; i--) {
        int j = (int)(xo_next(g.s) % (uint64_t)(i + 1)), x = perm[i];

        perm[i] = perm[j];
        perm[j] = x;
    }
    for (int r = 0; r < rg->E; r++)
        rg->rank[perm[r]] = r;
    free(perm);
    return 0;
}

static void router_gen_clear(struct router_gen *rg)
{
    free(rg->rank);
    free(rg->tmp);
}

/* Row e of the router: gain * (sign * rho * b_pair + sqrt(1 - rho^2) * n_e). */
static void router_row(const struct router_gen *rg, int e, float *out)
{
    int r = rg->rank[e], pair = r / 2;
    bool paired = (r ^ 1) < rg->E;
    double p = 1.0 / pow(pair + 1.0, ROUTER_ZIPF_A);
    float gain = (float)(ROUTER_GAIN_LO + ROUTER_GAIN_HI * p);
    float rho = paired ? (float)ROUTER_PAIR_RHO : 0.0f;
    float cn = sqrtf(1.0f - rho * rho), cb = (r & 1) ? -rho : rho;
    float a = sqrtf(3.0f / (float)rg->H);
    struct xoshiro g;

    xo_seed(&g, rg->key, 3, (uint64_t)e);
    fill_uniform(&g, out, (size_t)rg->H, a);
    xo_seed(&g, rg->key, 2, (uint64_t)pair);
    fill_uniform(&g, rg->tmp, (size_t)rg->H, a);
    for (int i = 0; i < rg->H; i++)
        out[i] = gain * (cn * out[i] + cb * rg->tmp[i]);
}

/* Converts n floats to dtype at dst. */
static void convert(enum moe_dtype dt, const float *src, size_t n, void *dst)
{
    if (dt == MOE_DTYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
    } else if (dt == MOE_DTYPE_BF16) {
        uint16_t *o = dst;

        for (size_t i = 0; i < n; i++)
            o[i] = moe_f32_to_bf16(src[i]);
    } else {
        uint16_t *o = dst;

        for (size_t i = 0; i < n; i++)
            o[i] = moe_f32_to_f16(src[i]);
    }
}

/* Scratch buffers of the generator. */
struct gen_buf {
    float *vals;          /* GEN_CHUNK floats */
    unsigned char *bytes; /* GEN_CHUNK * 4 bytes */
    const struct moe_genmodel_opts *o; /* for its progress callback */
    struct moe_genmodel_progress pr;
};

static void report(struct gen_buf *b)
{
    if (b->o->progress)
        b->o->progress(b->o->progress_ctx, &b->pr);
}

/*
 * The FP8 scale of block (br, bc) of the weight whose values are keyed by
 * key, noise of half-width a: a / 448 times a factor in [1, 2) from the
 * block, so that no value saturates and blocks differ.
 */
static float fp8_scale(uint64_t key, float a, int64_t br, int64_t bc)
{
    uint64_t x = key ^ ((uint64_t)br * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)bc << 32) ^ 0xf8f8ull;

    x = splitmix64(&x);
    return a / 448.0f * (1.0f + (float)(x >> 40) * 0x1p-24f);
}

/* Generates tensor t and hands its bytes to the writer. */
static int write_fused(struct moe_st_writer *w, const struct gtensor *t, const struct gdims *d,
                       struct gen_buf *b, struct moe_error *err);
static float inv_sqrt(int n);

static int write_tensor(struct moe_st_writer *w, const struct gtensor *t, const struct gdims *d,
                        struct gen_buf *b, struct moe_error *err)
{
    uint64_t seed = d->seed, key = tensor_key(seed, t->key_name[0] ? t->key_name : t->name);
    uint64_t done = 0;
    size_t esz = moe_dtype_size(t->dtype);
    struct router_gen rg = {0};
    struct xoshiro g;
    int r = 0;

    if (t->fuse != FUSE_NONE)
        return write_fused(w, t, d, b, err);
    xo_seed(&g, key, 0, 0);
    if (t->init == INIT_ROUTER) {
        r = router_gen_init(&rg, t, key);
        if (r < 0) {
            r = moe_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
    }
    while (done < t->count) {
        size_t n = (size_t)MOE_MIN((uint64_t)GEN_CHUNK, t->count - done);
        float a = t->scale * sqrtf(3.0f);

        switch (t->init) {
        case INIT_NOISE:
            fill_uniform(&g, b->vals, n, a);
            break;
        case INIT_FP8:
            /* the bf16 tensor's values (same key and stream), scaled down
             * by their block's scale and rounded to e4m3 */
            fill_uniform(&g, b->vals, n, a);
            for (size_t i = 0; i < n; i++) {
                uint64_t el = done + i;
                int64_t r0 = (int64_t)(el / (uint64_t)t->cols),
                        c0 = (int64_t)(el % (uint64_t)t->cols);

                b->bytes[i] = moe_f32_to_fp8_e4m3(
                    b->vals[i] / fp8_scale(key, a, r0 / GEN_FP8_BLOCK, c0 / GEN_FP8_BLOCK));
            }
            break;
        case INIT_FP8_SCALE: {
            int64_t sc = (t->cols + GEN_FP8_BLOCK - 1) / GEN_FP8_BLOCK;

            for (size_t i = 0; i < n; i++)
                b->vals[i] = fp8_scale(key, a, (int64_t)(done + i) / sc, (int64_t)(done + i) % sc);
            break;
        }
        case INIT_UNIFORM:
            fill_uniform(&g, b->vals, n, t->scale);
            break;
        case INIT_ONES:
            for (size_t i = 0; i < n; i++)
                b->vals[i] = 1.0f;
            break;
        case INIT_ROUTER:
            /* Whole rows per step: GEN_CHUNK >= MOE_MAX_HIDDEN. */
            n = (size_t)rg.H * MOE_MAX(1, GEN_CHUNK / rg.H);
            n = (size_t)MOE_MIN((uint64_t)n, t->count - done);
            for (size_t i = 0; i < n; i += (size_t)rg.H)
                router_row(&rg, (int)((done + i) / (uint64_t)rg.H), b->vals + i);
            break;
        }
        if (t->init != INIT_FP8)
            convert(t->dtype, b->vals, n, b->bytes);
        r = moe_st_writer_write(w, b->bytes, n * esz, err);
        if (r < 0)
            goto out;
        done += n;
        b->pr.bytes_done += n * esz;
        report(b);
    }
out:
    router_gen_clear(&rg);
    return r;
}

/* The per-expert name of expert e's part (0 gate, 1 up, 2 down) in layer i. */
static void expert_part_name(const struct gdims *d, int i, int e, int part, char *buf, size_t len)
{
    static const char *const mixtral[3] = {"w1", "w3", "w2"};
    static const char *const others[3] = {"gate_proj", "up_proj", "down_proj"};
    bool mx = d->arch == MOE_ARCH_MIXTRAL;

    snprintf(buf, len, "%s%d.%s.experts.%d.%s.weight", d->lp, i,
             mx                           ? "block_sparse_moe"
             : d->arch == MOE_ARCH_LLAMA4 ? "feed_forward"
                                          : "mlp",
             e, mx ? mixtral[part] : others[part]);
}

/* The values of a noise tensor t (count elements) into out, exactly as
 * write_tensor() generates them. */
static void noise_values(const struct gtensor *t, const struct gdims *d, float *out)
{
    struct xoshiro g;
    uint64_t done = 0;

    xo_seed(&g, tensor_key(d->seed, t->name), 0, 0);
    while (done < t->count) {
        size_t n = (size_t)MOE_MIN((uint64_t)GEN_CHUNK, t->count - done);

        fill_uniform(&g, out + done, n, t->scale * sqrtf(3.0f));
        done += n;
    }
}

/* Llama 4's transposed fused tensors: per expert, the per-expert tensors'
 * values (gate, up [F, H]; down [H, F]) written as x @ W wants them. */
static int write_fused_t(struct moe_st_writer *w, const struct gtensor *t, const struct gdims *d,
                         struct gen_buf *b, struct moe_error *err)
{
    const size_t FH = (size_t)d->F * (size_t)d->H, esz = moe_dtype_size(t->dtype);
    float *src = malloc(2 * FH * sizeof(float)), *dst = malloc(2 * FH * sizeof(float));
    unsigned char *bytes = malloc(2 * FH * esz);
    struct gtensor sub = {.dtype = t->dtype, .init = INIT_NOISE, .ndim = 2, .count = FH};
    int r = 0;

    if (!src || !dst || !bytes) {
        r = moe_error_set(err, -ENOMEM, "out of memory for an expert of %zu values", 2 * FH);
        goto out;
    }
    for (int e = 0; r == 0 && e < d->E; e++) {
        size_t n;

        if (t->fuse == FUSE_GATE_UP_T || t->fuse == FUSE_GATE_UP_TI) {
            const bool il = t->fuse == FUSE_GATE_UP_TI;

            for (int k = 0; k < 2; k++) {
                expert_part_name(d, t->layer, e, k, sub.name, sizeof(sub.name));
                sub.scale = inv_sqrt(d->H);
                noise_values(&sub, d, src + (size_t)k * FH);
            }
            /* [H, 2F]: row h = gate[:, h], then up[:, h]; interleaved:
             * gate[f, h] at column 2f, up[f, h] at 2f + 1. */
            for (int h = 0; h < d->H; h++)
                for (int f = 0; f < d->F; f++) {
                    size_t gc = il ? 2 * (size_t)f : (size_t)f;
                    size_t uc = il ? 2 * (size_t)f + 1 : (size_t)(d->F + f);

                    dst[(size_t)h * 2 * d->F + gc] = src[(size_t)f * d->H + h];
                    dst[(size_t)h * 2 * d->F + uc] = src[FH + (size_t)f * d->H + h];
                }
            n = 2 * FH;
        } else {
            expert_part_name(d, t->layer, e, 2, sub.name, sizeof(sub.name));
            sub.scale = inv_sqrt(d->F);
            noise_values(&sub, d, src);
            /* down [H, F] to [F, H]. */
            for (int f = 0; f < d->F; f++)
                for (int h = 0; h < d->H; h++)
                    dst[(size_t)f * d->H + h] = src[(size_t)h * d->F + f];
            n = FH;
        }
        convert(t->dtype, dst, n, bytes);
        r = moe_st_writer_write(w, bytes, n * esz, err);
        b->pr.bytes_done += n * esz;
        report(b);
    }
out:
    free(src);
    free(dst);
    free(bytes);
    return r;
}

/* gpt-oss's MXFP4 experts (FUSE_MX_*): per expert, the per-expert tensors'
 * values quantized row by row, the blocks or the scales. */
static int write_mxfp4(struct moe_st_writer *w, const struct gtensor *t, const struct gdims *d,
                       struct gen_buf *b, struct moe_error *err)
{
    const size_t FH = (size_t)d->F * (size_t)d->H;
    const bool gu = t->fuse == FUSE_MX_GATE_UP || t->fuse == FUSE_MX_GATE_UP_S;
    const bool scales = t->fuse == FUSE_MX_GATE_UP_S || t->fuse == FUSE_MX_DOWN_S;
    const int64_t rows = gu ? 2 * (int64_t)d->F : d->H, cols = gu ? d->H : d->F;
    const size_t rb = scales ? (size_t)cols / 32 : (size_t)cols / 2;
    float *src = malloc(2 * FH * sizeof(float));
    uint8_t *out = malloc((size_t)rows * rb), *other = malloc((size_t)cols);
    struct gtensor sub = {.dtype = MOE_DTYPE_BF16, .init = INIT_NOISE, .ndim = 2, .count = FH};
    int r = 0;

    if (!src || !out || !other) {
        r = moe_error_set(err, -ENOMEM, "out of memory for an expert of %zu values", 2 * FH);
        goto out;
    }
    for (int e = 0; r == 0 && e < d->E; e++) {
        for (int k = 0; k < (gu ? 2 : 1); k++) {
            expert_part_name(d, t->layer, e, gu ? k : 2, sub.name, sizeof(sub.name));
            sub.scale = inv_sqrt((int)cols);
            noise_values(&sub, d, src + (size_t)k * FH);
        }
        for (int64_t i = 0; i < rows; i++) {
            /* gate_up: row 2f gate[f], row 2f + 1 up[f]; down: down[i] */
            const float *row = gu ? src + (size_t)(i % 2) * FH + (size_t)(i / 2) * (size_t)cols
                                  : src + (size_t)i * (size_t)cols;

            if (scales)
                moe_quant_mxfp4_row(row, cols, other, out + (size_t)i * rb);
            else
                moe_quant_mxfp4_row(row, cols, out + (size_t)i * rb, other);
        }
        r = moe_st_writer_write(w, out, (size_t)rows * rb, err);
        b->pr.bytes_done += (size_t)rows * rb;
        report(b);
    }
out:
    free(src);
    free(out);
    free(other);
    return r;
}

/* A fused tensor: expert by expert, the per-expert tensors' values. */
static int write_fused(struct moe_st_writer *w, const struct gtensor *t, const struct gdims *d,
                       struct gen_buf *b, struct moe_error *err)
{
    struct gtensor sub = {.dtype = t->dtype, .init = INIT_NOISE, .ndim = 2};
    int r = 0;

    if (t->fuse == FUSE_GATE_UP_T || t->fuse == FUSE_DOWN_T || t->fuse == FUSE_GATE_UP_TI)
        return write_fused_t(w, t, d, b, err);
    if (t->fuse >= FUSE_MX_GATE_UP)
        return write_mxfp4(w, t, d, b, err);
    for (int e = 0; r == 0 && e < d->E; e++) {
        for (int k = 0; r == 0 && k < (t->fuse == FUSE_GATE_UP ? 2 : 1); k++) {
            int part = t->fuse == FUSE_GATE_UP ? k : 2;

            expert_part_name(d, t->layer, e, part, sub.name, sizeof(sub.name));
            sub.shape[0] = part == 2 ? d->H : d->F;
            sub.shape[1] = part == 2 ? d->F : d->H;
            sub.scale = inv_sqrt((int)sub.shape[1]);
            sub.count = (uint64_t)d->F * (uint64_t)d->H;
            r = write_tensor(w, &sub, d, b, err);
        }
    }
    return r;
}

/* ---- layouts ------------------------------------------------------------- */

/* config.json model_type (as moe_arch_name(), kept here so that the generator
 * does not depend on the loader). */
static const char *const arch_type[MOE_ARCH_COUNT] = {
    [MOE_ARCH_MIXTRAL] = "mixtral",         [MOE_ARCH_QWEN2_MOE] = "qwen2_moe",
    [MOE_ARCH_QWEN3_MOE] = "qwen3_moe",     [MOE_ARCH_OLMOE] = "olmoe",
    [MOE_ARCH_DEEPSEEK_V3] = "deepseek_v3", [MOE_ARCH_DEEPSEEK_V2] = "deepseek_v2",
    [MOE_ARCH_KIMI_K2] = "kimi_k2",         [MOE_ARCH_GLM4_MOE] = "glm4_moe",
    [MOE_ARCH_QWEN3_NEXT] = "qwen3_next",   [MOE_ARCH_QWEN3_5_MOE] = "qwen3_5_moe",
    [MOE_ARCH_LLAMA4] = "llama4_text",      [MOE_ARCH_GPT_OSS] = "gpt_oss",
};

static const char *const arch_class[MOE_ARCH_COUNT] = {
    [MOE_ARCH_MIXTRAL] = "MixtralForCausalLM",
    [MOE_ARCH_QWEN2_MOE] = "Qwen2MoeForCausalLM",
    [MOE_ARCH_QWEN3_MOE] = "Qwen3MoeForCausalLM",
    [MOE_ARCH_OLMOE] = "OlmoeForCausalLM",
    [MOE_ARCH_DEEPSEEK_V3] = "DeepseekV3ForCausalLM",
    [MOE_ARCH_DEEPSEEK_V2] = "DeepseekV2ForCausalLM",
    /* Kimi K2 ships DeepSeek-V3's class under its own model type. */
    [MOE_ARCH_KIMI_K2] = "DeepseekV3ForCausalLM",
    [MOE_ARCH_GLM4_MOE] = "Glm4MoeForCausalLM",
    [MOE_ARCH_QWEN3_NEXT] = "Qwen3NextForCausalLM",
    /* The released Qwen3.5-MoE: the multimodal class (text_config). */
    [MOE_ARCH_QWEN3_5_MOE] = "Qwen3_5MoeForConditionalGeneration",
    [MOE_ARCH_LLAMA4] = "Llama4ForCausalLM",
    [MOE_ARCH_GPT_OSS] = "GptOssForCausalLM",
};

/* DeepSeek's layout: shared_experts, first_k_dense_replace, e_score_correction_bias
 * (not deepseek_v2). */
static bool deepseek_like(enum moe_arch a)
{
    return a == MOE_ARCH_DEEPSEEK_V3 || a == MOE_ARCH_DEEPSEEK_V2 || a == MOE_ARCH_KIMI_K2 ||
           a == MOE_ARCH_GLM4_MOE;
}

/* Multi-head latent attention (DeepSeek-V2/V3, Kimi K2). */
/* Qwen's shared expert with its sigmoid gate. */
static bool qwen_shared(enum moe_arch a)
{
    return a == MOE_ARCH_QWEN2_MOE || a == MOE_ARCH_QWEN3_NEXT || a == MOE_ARCH_QWEN3_5_MOE;
}

/* Qwen3-Next's and Qwen3.5's gated attention: q_proj twice as wide, q/k norms. */
static bool qwen_gated_attn(enum moe_arch a)
{
    return a == MOE_ARCH_QWEN3_NEXT || a == MOE_ARCH_QWEN3_5_MOE;
}

static bool has_mla(enum moe_arch a)
{
    return a == MOE_ARCH_DEEPSEEK_V3 || a == MOE_ARCH_DEEPSEEK_V2 || a == MOE_ARCH_KIMI_K2;
}

void moe_genmodel_defaults(enum moe_arch arch, struct moe_genmodel_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->arch = arch;
    o->n_layers = 4;
    o->hidden = 256;
    o->dtype = MOE_DTYPE_BF16;
    o->n_shards = 1;
    o->seed = 0;
    switch (arch) {
    case MOE_ARCH_MIXTRAL:
        o->n_experts = 8;
        o->top_k = 2;
        o->ffn = 512;
        o->n_shared = 0;
        break;
    case MOE_ARCH_QWEN2_MOE:
        o->n_experts = 16;
        o->top_k = 4;
        o->ffn = 128;
        o->n_shared = 1;
        break;
    case MOE_ARCH_QWEN3_MOE:
        o->n_experts = 32;
        o->top_k = 4;
        o->ffn = 128;
        o->n_shared = 0;
        break;
    case MOE_ARCH_OLMOE:
        o->n_experts = 16;
        o->top_k = 4;
        o->ffn = 128;
        o->n_shared = 0;
        break;
    case MOE_ARCH_DEEPSEEK_V2:
        o->n_experts = 32;
        o->top_k = 4;
        o->ffn = 128;
        o->n_shared = 2;
        break;
    case MOE_ARCH_QWEN3_NEXT:
    case MOE_ARCH_QWEN3_5_MOE:
        /* Many fine-grained experts, as Qwen3-Next (512, top-10) and
         * Qwen3.5-MoE (256, top-8), and one gated shared expert. */
        o->n_experts = 64;
        o->top_k = 8;
        o->ffn = 64;
        o->n_shared = 1;
        break;
    case MOE_ARCH_LLAMA4:
        /* Scout: 16 experts, top-1, and one shared expert. */
        o->n_experts = 16;
        o->top_k = 1;
        o->ffn = 128;
        o->n_shared = 1;
        break;
    case MOE_ARCH_GPT_OSS:
        /* gpt-oss-20b: 32 experts, top-4, no shared expert. */
        o->n_experts = 16;
        o->top_k = 4;
        o->ffn = 128;
        o->n_shared = 0;
        break;
    case MOE_ARCH_DEEPSEEK_V3:
    default:
        o->n_experts = 32;
        o->top_k = 4;
        o->ffn = 128;
        o->n_shared = 1;
        break;
    }
}

/* Largest divisor of n that is <= cap (>= 1). */
static int divisor_at_most(int n, int cap)
{
    for (int d = MOE_MAX(1, MOE_MIN(n, cap)); d > 1; d--)
        if (n % d == 0)
            return d;
    return 1;
}

/*
 * DeepSeek groups: the defaults' 4 groups (top 2) for 32 experts, otherwise
 * the largest of 8, 4, 2, 1 groups dividing the experts with >= 2 experts per
 * group and top_k within the kept groups (topk_group = n_group / 2, raised
 * when needed).  One group (no group limit) always works.
 */
static void deepseek_groups(int E, int K, int *ret_groups, int *ret_topk_group)
{
    static const int cand[] = {8, 4, 2};

    if (E == 32 && K <= 16) {
        *ret_groups = 4;
        *ret_topk_group = 2;
        return;
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(cand); i++) {
        int g = cand[i], size, tg;

        if (E % g != 0 || E / g < 2)
            continue;
        size = E / g;
        tg = MOE_MAX(1, g / 2);
        while (tg < g && K > tg * size)
            tg++;
        if (K <= tg * size) {
            *ret_groups = g;
            *ret_topk_group = tg;
            return;
        }
    }
    *ret_groups = 1;
    *ret_topk_group = 1;
}

/* Fills d from o (defaults for unset values) and checks it. */
static int resolve_dims(const struct moe_genmodel_opts *o, struct gdims *d, struct moe_error *err)
{
    struct moe_genmodel_opts def;
    const char *an;

    if ((unsigned)o->arch >= MOE_ARCH_COUNT)
        return moe_error_set(err, -EINVAL, "unknown architecture %d", (int)o->arch);
    an = arch_type[o->arch];
    moe_genmodel_defaults(o->arch, &def);
    memset(d, 0, sizeof(*d));
    d->arch = o->arch;
    d->L = o->n_layers > 0 ? o->n_layers : def.n_layers;
    d->E = o->n_experts > 0 ? o->n_experts : def.n_experts;
    d->K = o->top_k > 0 ? o->top_k : def.top_k;
    d->H = o->hidden > 0 ? o->hidden : def.hidden;
    d->F = o->ffn > 0 ? o->ffn : def.ffn;
    d->n_shared = o->n_shared == -1 ? def.n_shared : o->n_shared;
    d->n_shards = o->n_shards > 0 ? o->n_shards : 1;
    d->dtype = o->dtype;
    if (d->dtype == MOE_DTYPE_F8_E4M3) {
        /* FP8 linear weights, everything else bf16 (the published layout) */
        d->fp8 = true;
        d->dtype = MOE_DTYPE_BF16;
    }
    d->seed = o->seed;
    d->multimodal = d->arch == MOE_ARCH_QWEN3_5_MOE;
    d->lp = d->multimodal ? "model.language_model.layers." : "model.layers.";
    d->mp = d->multimodal ? "model.language_model." : "model.";
    if ((unsigned)o->layout > MOE_GEN_LAYOUT_FUSED)
        return moe_error_set(err, -EINVAL, "unknown expert layout %d", (int)o->layout);
    d->fused = o->layout == MOE_GEN_LAYOUT_FUSED ||
               (o->layout == MOE_GEN_LAYOUT_DEFAULT &&
                (d->arch == MOE_ARCH_QWEN3_5_MOE || d->arch == MOE_ARCH_LLAMA4 ||
                 d->arch == MOE_ARCH_GPT_OSS));
    d->moe_step = 1;

    if (d->dtype != MOE_DTYPE_BF16 && d->dtype != MOE_DTYPE_F16 && d->dtype != MOE_DTYPE_F32)
        return moe_error_set(err, -EINVAL, "dtype %s: expected bf16, f16, f32 or fp8",
                             moe_dtype_user_name(d->dtype));
    if (o->quant != MOE_QUANT_NONE && o->quant != MOE_QUANT_MXFP4)
        return moe_error_set(err, -EINVAL, "quantization %s: expected mxfp4 (or fp8 as the dtype)",
                             moe_quant_name(o->quant));
    d->mxfp4 = o->quant == MOE_QUANT_MXFP4;
    if (d->mxfp4 && (d->arch != MOE_ARCH_GPT_OSS || d->fp8 || d->dtype != MOE_DTYPE_BF16))
        return moe_error_set(err, -EINVAL,
                             "mxfp4: only gpt_oss is released with MXFP4 experts (and bf16 "
                             "for the rest); %s %s asked for",
                             an, d->fp8 ? "fp8" : moe_dtype_user_name(d->dtype));
    if (d->mxfp4 && (d->H % 32 != 0 || d->F % 32 != 0))
        return moe_error_set(err, -EINVAL,
                             "mxfp4: hidden size %d and expert ffn %d must be multiples of 32",
                             d->H, d->F);
    if (d->fp8 && d->fused)
        return moe_error_set(err, -EINVAL,
                             "fp8: the FP8 releases store their experts one by one: use the "
                             "per-expert layout (%s stores them fused)",
                             an);
    if (d->L > MOE_MAX_LAYERS)
        return moe_error_set(err, -EINVAL, "%d layers: at most %d", d->L, MOE_MAX_LAYERS);
    if (d->E > MOE_MAX_EXPERTS)
        return moe_error_set(err, -EINVAL, "%d experts: at most %d", d->E, MOE_MAX_EXPERTS);
    if (d->K > MOE_MAX_TOP_K)
        return moe_error_set(err, -EINVAL, "top-k %d: at most %d", d->K, MOE_MAX_TOP_K);
    if (d->K > d->E)
        return moe_error_set(err, -EINVAL, "top-k %d is more than the %d experts", d->K, d->E);
    if (d->H > MOE_MAX_HIDDEN)
        return moe_error_set(err, -EINVAL, "hidden size %d: at most %d", d->H, MOE_MAX_HIDDEN);
    if (d->F > MOE_MAX_FFN)
        return moe_error_set(err, -EINVAL, "expert ffn %d: at most %d", d->F, MOE_MAX_FFN);
    if (d->n_shared < 0)
        return moe_error_set(err, -EINVAL, "%d shared experts: expected 0 or more (-1: default)",
                             d->n_shared);
    if (d->n_shards > GEN_MAX_SHARDS)
        return moe_error_set(err, -EINVAL, "%d shards: at most %d", d->n_shards, GEN_MAX_SHARDS);

    d->dense_ffn = MOE_MIN(4 * d->F, MOE_MAX_FFN);
    switch (d->arch) {
    case MOE_ARCH_MIXTRAL:
    case MOE_ARCH_QWEN3_MOE:
    case MOE_ARCH_OLMOE:
    case MOE_ARCH_GPT_OSS:
        if (d->n_shared > 0)
            return moe_error_set(err, -EINVAL, "%s has no shared experts (asked for %d)", an,
                                 d->n_shared);
        if (d->arch == MOE_ARCH_GPT_OSS && !d->fused)
            return moe_error_set(err, -EINVAL,
                                 "%s: the per-expert layout does not exist for gpt_oss "
                                 "(transformers writes its experts fused only): use --layout "
                                 "fused or the default",
                                 an);
        break;
    case MOE_ARCH_QWEN2_MOE:
    case MOE_ARCH_QWEN3_NEXT:
    case MOE_ARCH_QWEN3_5_MOE:
        if (d->n_shared > 1)
            return moe_error_set(err, -EINVAL, "%s has at most one shared expert (asked for %d)",
                                 an, d->n_shared);
        d->shared_ffn = d->n_shared ? MOE_MIN(4 * d->F, MOE_MAX_FFN) : 0;
        break;
    case MOE_ARCH_LLAMA4:
        if (d->n_shared != 1)
            return moe_error_set(err, -EINVAL, "%s has exactly one shared expert (asked for %d)",
                                 an, d->n_shared);
        d->shared_ffn = d->F;
        /* Dense and MoE layers interleaved, as Llama 4 Maverick. */
        d->moe_step = d->L > 1 ? 2 : 1;
        break;
    case MOE_ARCH_DEEPSEEK_V3:
    default:
        if (d->n_shared > GEN_MAX_SHARED)
            return moe_error_set(err, -EINVAL, "%d shared experts: at most %d", d->n_shared,
                                 GEN_MAX_SHARED);
        if ((int64_t)d->n_shared * d->F > MOE_MAX_FFN)
            return moe_error_set(err, -EINVAL,
                                 "%d shared experts of ffn %d: fused ffn %lld over %d", d->n_shared,
                                 d->F, (long long)d->n_shared * d->F, MOE_MAX_FFN);
        d->shared_ffn = d->n_shared * d->F;
        /* Layer 0 dense, as V3's first_k_dense_replace, unless it is the only one. */
        d->first_dense = d->L > 1 ? 1 : 0;
        if (d->arch == MOE_ARCH_KIMI_K2 || d->arch == MOE_ARCH_GLM4_MOE) {
            /* As Kimi K2 and GLM-4.5 ship: one group. */
            d->n_group = 1;
            d->topk_group = 1;
        } else {
            deepseek_groups(d->E, d->K, &d->n_group, &d->topk_group);
        }
        break;
    }

    if (has_mla(d->arch)) {
        d->n_heads = DS_HEADS;
        d->n_kv = DS_HEADS;
        d->head_dim = DS_ROPE_DIM;
    } else {
        /* heads * head_dim = hidden up to 32 heads of 64: small, and the
         * layout transformers versions without head_dim expect. */
        d->head_dim = divisor_at_most(d->H, 64);
        d->n_heads = MOE_MIN(d->H / d->head_dim, 32);
        d->n_kv = divisor_at_most(d->n_heads, MOE_MAX(1, d->n_heads / 4));
    }
    return 0;
}

static int plan_add(struct gplan *p, enum moe_dtype dt, enum init_kind init, float scale,
                    int64_t d0, int64_t d1, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

/* A linear projection's weight: "*_proj.weight", mixtral's experts' w1/w2/w3. */
static bool fp8_name(const char *name)
{
    static const char *const ends[] = {"_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"};
    size_t n = strlen(name);

    for (size_t i = 0; i < MOE_ARRAY_SIZE(ends); i++) {
        size_t k = strlen(ends[i]);

        if (n >= k && strcmp(name + n - k, ends[i]) == 0)
            return true;
    }
    return false;
}

/* Appends a tensor; d1 < 0 for a 1-D tensor [d0]. */
static int plan_add(struct gplan *p, enum moe_dtype dt, enum init_kind init, float scale,
                    int64_t d0, int64_t d1, const char *fmt, ...)
{
    struct gtensor *t;
    va_list ap;
    int n;

    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        struct gtensor *nt = reallocarray(p->t, cap, sizeof(*nt));

        if (!nt)
            return -ENOMEM;
        p->t = nt;
        p->cap = cap;
    }
    t = &p->t[p->n];
    memset(t, 0, sizeof(*t));
    va_start(ap, fmt);
    n = vsnprintf(t->name, sizeof(t->name), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(t->name))
        return -ENAMETOOLONG;
    t->dtype = dt;
    t->init = init;
    t->scale = scale;
    t->ndim = d1 < 0 ? 1 : 2;
    t->shape[0] = d0;
    t->shape[1] = d1 < 0 ? 0 : d1;
    t->count = (uint64_t)d0 * (uint64_t)(d1 < 0 ? 1 : d1);
    t->nbytes = t->count * moe_dtype_size(dt);
    p->total_bytes += t->nbytes;
    p->n++;
    /* FP8 (DeepSeek-V3, Qwen3 FP8): every linear projection's weight as e4m3
     * with its weight_scale_inv beside it; routers, embeddings, norms and
     * the lm head stay bf16. */
    if (p->d.fp8 && init == INIT_NOISE && d1 > 0 && dt == p->d.dtype &&
        (fp8_name(t->name) && strcmp(t->name, "lm_head.weight") != 0)) {
        char wname[GEN_NAME_MAX];
        struct gtensor *w;
        int64_t sr = (d0 + GEN_FP8_BLOCK - 1) / GEN_FP8_BLOCK,
                sc = (d1 + GEN_FP8_BLOCK - 1) / GEN_FP8_BLOCK;
        int r;

        p->total_bytes -= t->nbytes;
        t->dtype = MOE_DTYPE_F8_E4M3;
        t->init = INIT_FP8;
        t->rows = d0;
        t->cols = d1;
        t->nbytes = t->count;
        p->total_bytes += t->nbytes;
        /* the name copied first: plan_add may move p->t */
        snprintf(wname, sizeof(wname), "%s", t->name);
        r = plan_add(p, MOE_DTYPE_F32, INIT_FP8_SCALE, scale, sr, sc, "%s_scale_inv", wname);
        if (r < 0)
            return r;
        w = &p->t[p->n - 2];
        t = &p->t[p->n - 1];
        snprintf(t->key_name, sizeof(t->key_name), "%s", w->key_name[0] ? w->key_name : w->name);
        t->rows = d0;
        t->cols = d1;
    }
    return 0;
}

#define ADD(...)                                                                                   \
    do {                                                                                           \
        int _r = plan_add(p, __VA_ARGS__);                                                         \
        if (_r < 0)                                                                                \
            return _r;                                                                             \
    } while (0)

/* Appends a fused expert tensor [d0, d1, d2] of layer. */
static int plan_add3(struct gplan *p, enum fuse_kind fuse, int layer, int64_t d0, int64_t d1,
                     int64_t d2, const char *fmt, ...) __attribute__((format(printf, 7, 8)));

static int plan_add3(struct gplan *p, enum fuse_kind fuse, int layer, int64_t d0, int64_t d1,
                     int64_t d2, const char *fmt, ...)
{
    struct gtensor *t;
    va_list ap;
    int r, n;

    r = plan_add(p, p->d.dtype, INIT_NOISE, 0, d0, d1 * d2, "-");
    if (r < 0)
        return r;
    t = &p->t[p->n - 1];
    va_start(ap, fmt);
    n = vsnprintf(t->name, sizeof(t->name), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(t->name))
        return -ENAMETOOLONG;
    t->ndim = 3;
    t->shape[1] = d1;
    t->shape[2] = d2;
    t->fuse = fuse;
    t->layer = layer;
    return 0;
}

#define ADD3(...)                                                                                  \
    do {                                                                                           \
        int _r = plan_add3(p, __VA_ARGS__);                                                        \
        if (_r < 0)                                                                                \
            return _r;                                                                             \
    } while (0)

static float inv_sqrt(int n)
{
    return 1.0f / sqrtf((float)n);
}

/* A SwiGLU block of ffn rows: gate/up [ffn, H], down [H, ffn]; names
 * "<prefix>.<g>.weight" etc. */
static int add_ffn(struct gplan *p, const char *prefix, const char *g, const char *u,
                   const char *dn, int ffn)
{
    enum moe_dtype dt = p->d.dtype;
    int H = p->d.H;

    /* Model order of the reference modules: gate, up, down (mixtral w1, w2, w3). */
    if (p->d.arch == MOE_ARCH_MIXTRAL && strcmp(g, "w1") == 0) {
        ADD(dt, INIT_NOISE, inv_sqrt(H), ffn, H, "%s.w1.weight", prefix);
        ADD(dt, INIT_NOISE, inv_sqrt(ffn), H, ffn, "%s.w2.weight", prefix);
        ADD(dt, INIT_NOISE, inv_sqrt(H), ffn, H, "%s.w3.weight", prefix);
        return 0;
    }
    ADD(dt, INIT_NOISE, inv_sqrt(H), ffn, H, "%s.%s.weight", prefix, g);
    ADD(dt, INIT_NOISE, inv_sqrt(H), ffn, H, "%s.%s.weight", prefix, u);
    ADD(dt, INIT_NOISE, inv_sqrt(ffn), H, ffn, "%s.%s.weight", prefix, dn);
    return 0;
}

static int add_attention(struct gplan *p, int i)
{
    const struct gdims *d = &p->d;
    enum moe_dtype dt = d->dtype;
    int H = d->H, qd = d->n_heads * d->head_dim, kvd = d->n_kv * d->head_dim;
    const float s = 0.02f;

    if (has_mla(d->arch)) {
        int qk = DS_NOPE_DIM + DS_ROPE_DIM;

        ADD(dt, INIT_NOISE, s, DS_Q_LORA, H, "%s%d.self_attn.q_a_proj.weight", d->lp, i);
        ADD(dt, INIT_ONES, 0, DS_Q_LORA, -1, "%s%d.self_attn.q_a_layernorm.weight", d->lp, i);
        ADD(dt, INIT_NOISE, s, (int64_t)d->n_heads * qk, DS_Q_LORA,
            "%s%d.self_attn.q_b_proj.weight", d->lp, i);
        ADD(dt, INIT_NOISE, s, DS_KV_LORA + DS_ROPE_DIM, H,
            "%s%d.self_attn.kv_a_proj_with_mqa.weight", d->lp, i);
        ADD(dt, INIT_ONES, 0, DS_KV_LORA, -1, "%s%d.self_attn.kv_a_layernorm.weight", d->lp, i);
        ADD(dt, INIT_NOISE, s, (int64_t)d->n_heads * (DS_NOPE_DIM + DS_V_DIM), DS_KV_LORA,
            "%s%d.self_attn.kv_b_proj.weight", d->lp, i);
        ADD(dt, INIT_NOISE, s, H, (int64_t)d->n_heads * DS_V_DIM, "%s%d.self_attn.o_proj.weight",
            d->lp, i);
        return 0;
    }
    /* Qwen3-Next's q_proj also gives the output gate: 2 x heads x head_dim. */
    ADD(dt, INIT_NOISE, s, qwen_gated_attn(d->arch) ? 2 * qd : qd, H,
        "%s%d.self_attn.q_proj.weight", d->lp, i);
    if (d->arch == MOE_ARCH_QWEN2_MOE || d->arch == MOE_ARCH_GLM4_MOE)
        ADD(dt, INIT_UNIFORM, 0.05f, qd, -1, "%s%d.self_attn.q_proj.bias", d->lp, i);
    ADD(dt, INIT_NOISE, s, kvd, H, "%s%d.self_attn.k_proj.weight", d->lp, i);
    if (d->arch == MOE_ARCH_QWEN2_MOE || d->arch == MOE_ARCH_GLM4_MOE)
        ADD(dt, INIT_UNIFORM, 0.05f, kvd, -1, "%s%d.self_attn.k_proj.bias", d->lp, i);
    ADD(dt, INIT_NOISE, s, kvd, H, "%s%d.self_attn.v_proj.weight", d->lp, i);
    if (d->arch == MOE_ARCH_QWEN2_MOE || d->arch == MOE_ARCH_GLM4_MOE)
        ADD(dt, INIT_UNIFORM, 0.05f, kvd, -1, "%s%d.self_attn.v_proj.bias", d->lp, i);
    ADD(dt, INIT_NOISE, s, H, qd, "%s%d.self_attn.o_proj.weight", d->lp, i);
    if (d->arch == MOE_ARCH_GPT_OSS) {
        /* attention_bias true, and a learnt sink per head. */
        ADD(dt, INIT_UNIFORM, 0.05f, qd, -1, "%s%d.self_attn.q_proj.bias", d->lp, i);
        ADD(dt, INIT_UNIFORM, 0.05f, kvd, -1, "%s%d.self_attn.k_proj.bias", d->lp, i);
        ADD(dt, INIT_UNIFORM, 0.05f, kvd, -1, "%s%d.self_attn.v_proj.bias", d->lp, i);
        ADD(dt, INIT_UNIFORM, 0.05f, H, -1, "%s%d.self_attn.o_proj.bias", d->lp, i);
        ADD(dt, INIT_UNIFORM, 0.05f, d->n_heads, -1, "%s%d.self_attn.sinks", d->lp, i);
    }
    if (d->arch == MOE_ARCH_QWEN3_MOE || qwen_gated_attn(d->arch)) {
        ADD(dt, INIT_ONES, 0, d->head_dim, -1, "%s%d.self_attn.q_norm.weight", d->lp, i);
        ADD(dt, INIT_ONES, 0, d->head_dim, -1, "%s%d.self_attn.k_norm.weight", d->lp, i);
    } else if (d->arch == MOE_ARCH_OLMOE) {
        ADD(dt, INIT_ONES, 0, qd, -1, "%s%d.self_attn.q_norm.weight", d->lp, i);
        ADD(dt, INIT_ONES, 0, kvd, -1, "%s%d.self_attn.k_norm.weight", d->lp, i);
    }
    return 0;
}

/* Llama 4's MoE block: feed_forward.router, the experts fused and
 * transposed (or per expert, as a packed store has them), a shared expert. */
static int add_moe_llama4(struct gplan *p, int i)
{
    const struct gdims *d = &p->d;
    char prefix[GEN_NAME_MAX];
    int r;

    ADD(d->dtype, INIT_ROUTER, 0, d->E, d->H, "%s%d.feed_forward.router.weight", d->lp, i);
    if (d->fused) {
        ADD3(FUSE_GATE_UP_T, i, d->E, d->H, 2 * (int64_t)d->F,
             "%s%d.feed_forward.experts.gate_up_proj", d->lp, i);
        ADD3(FUSE_DOWN_T, i, d->E, d->F, d->H, "%s%d.feed_forward.experts.down_proj", d->lp, i);
    }
    for (int e = 0; !d->fused && e < d->E; e++) {
        snprintf(prefix, sizeof(prefix), "%s%d.feed_forward.experts.%d", d->lp, i, e);
        r = add_ffn(p, prefix, "gate_proj", "up_proj", "down_proj", d->F);
        if (r < 0)
            return r;
    }
    snprintf(prefix, sizeof(prefix), "%s%d.feed_forward.shared_expert", d->lp, i);
    return add_ffn(p, prefix, "gate_proj", "up_proj", "down_proj", d->shared_ffn);
}

/* One of gpt-oss's MXFP4 expert tensors: U8 [E, rows, cols / 32, 16]
 * (blocks) or [E, rows, cols / 32] (scales). */
static int add_mxfp4(struct gplan *p, enum fuse_kind fuse, int layer, int64_t rows, int64_t cols,
                     const char *name)
{
    bool sc = fuse == FUSE_MX_GATE_UP_S || fuse == FUSE_MX_DOWN_S;
    struct gtensor *t;
    int r = plan_add(p, MOE_DTYPE_U8, INIT_NOISE, 0, p->d.E, rows * cols / (sc ? 32 : 2), "%s%d.%s",
                     p->d.lp, layer, name);

    if (r < 0)
        return r;
    t = &p->t[p->n - 1];
    t->ndim = sc ? 3 : 4;
    t->shape[1] = rows;
    t->shape[2] = cols / 32;
    t->shape[3] = sc ? 0 : 16;
    t->fuse = fuse;
    t->layer = layer;
    return 0;
}

/* gpt-oss's MoE block: mlp.router with a bias, the experts fused,
 * transposed and interleaved (or MXFP4, as released), with their biases. */
static int add_moe_gpt_oss(struct gplan *p, int i)
{
    const struct gdims *d = &p->d;
    const int64_t F2 = 2 * (int64_t)d->F;
    int r;

    ADD(d->dtype, INIT_ROUTER, 0, d->E, d->H, "%s%d.mlp.router.weight", d->lp, i);
    ADD(d->dtype, INIT_UNIFORM, 0.05f, d->E, -1, "%s%d.mlp.router.bias", d->lp, i);
    if (d->mxfp4) {
        /* as released: each projection's blocks and scales (U8), and bias */
        r = add_mxfp4(p, FUSE_MX_GATE_UP, i, F2, d->H, "mlp.experts.gate_up_proj_blocks");
        if (r == 0)
            r = add_mxfp4(p, FUSE_MX_GATE_UP_S, i, F2, d->H, "mlp.experts.gate_up_proj_scales");
        if (r < 0)
            return r;
        ADD(d->dtype, INIT_UNIFORM, 0.05f, d->E, F2, "%s%d.mlp.experts.gate_up_proj_bias", d->lp,
            i);
        r = add_mxfp4(p, FUSE_MX_DOWN, i, d->H, d->F, "mlp.experts.down_proj_blocks");
        if (r == 0)
            r = add_mxfp4(p, FUSE_MX_DOWN_S, i, d->H, d->F, "mlp.experts.down_proj_scales");
        if (r < 0)
            return r;
        ADD(d->dtype, INIT_UNIFORM, 0.05f, d->E, d->H, "%s%d.mlp.experts.down_proj_bias", d->lp, i);
        return 0;
    }
    ADD3(FUSE_GATE_UP_TI, i, d->E, d->H, 2 * (int64_t)d->F, "%s%d.mlp.experts.gate_up_proj", d->lp,
         i);
    ADD(d->dtype, INIT_UNIFORM, 0.05f, d->E, 2 * (int64_t)d->F,
        "%s%d.mlp.experts.gate_up_proj_bias", d->lp, i);
    ADD3(FUSE_DOWN_T, i, d->E, d->F, d->H, "%s%d.mlp.experts.down_proj", d->lp, i);
    ADD(d->dtype, INIT_UNIFORM, 0.05f, d->E, d->H, "%s%d.mlp.experts.down_proj_bias", d->lp, i);
    return 0;
}

static int add_moe(struct gplan *p, int i)
{
    const struct gdims *d = &p->d;
    enum moe_dtype dt = d->dtype;
    bool mixtral = d->arch == MOE_ARCH_MIXTRAL;
    const char *blk = mixtral ? "block_sparse_moe" : "mlp";
    char prefix[GEN_NAME_MAX];
    int r;

    if (d->arch == MOE_ARCH_LLAMA4)
        return add_moe_llama4(p, i);
    if (d->arch == MOE_ARCH_GPT_OSS)
        return add_moe_gpt_oss(p, i);

    /* The fused layout names mixtral's block mlp too; its router keeps the
     * per-expert layout's values. */
    ADD(dt, INIT_ROUTER, 0, d->E, d->H, "%s%d.%s.gate.weight", d->lp, i, d->fused ? "mlp" : blk);
    snprintf(p->t[p->n - 1].key_name, GEN_NAME_MAX, "%s%d.%s.gate.weight", d->lp, i, blk);
    if (deepseek_like(d->arch) && d->arch != MOE_ARCH_DEEPSEEK_V2)
        ADD(MOE_DTYPE_F32, INIT_UNIFORM, 0.05f, d->E, -1, "%s%d.mlp.gate.e_score_correction_bias",
            d->lp, i);
    if (d->fused) {
        /* Expert-major, as transformers writes them; values from the
         * per-expert tensors (write_fused). */
        ADD3(FUSE_GATE_UP, i, d->E, 2 * (int64_t)d->F, d->H, "%s%d.mlp.experts.gate_up_proj", d->lp,
             i);
        ADD3(FUSE_DOWN, i, d->E, d->H, d->F, "%s%d.mlp.experts.down_proj", d->lp, i);
    }
    for (int e = 0; !d->fused && e < d->E; e++) {
        snprintf(prefix, sizeof(prefix), "%s%d.%s.experts.%d", d->lp, i, blk, e);
        r = mixtral ? add_ffn(p, prefix, "w1", "w3", "w2", d->F)
                    : add_ffn(p, prefix, "gate_proj", "up_proj", "down_proj", d->F);
        if (r < 0)
            return r;
    }
    if (d->shared_ffn > 0) {
        bool qwen = qwen_shared(d->arch);

        snprintf(prefix, sizeof(prefix), "%s%d.mlp.%s", d->lp, i,
                 qwen ? "shared_expert" : "shared_experts");
        r = add_ffn(p, prefix, "gate_proj", "up_proj", "down_proj", d->shared_ffn);
        if (r < 0)
            return r;
        if (qwen)
            ADD(dt, INIT_NOISE, inv_sqrt(d->H), 1, d->H, "%s%d.mlp.shared_expert_gate.weight",
                d->lp, i);
    }
    return 0;
}

static int build_plan(struct gplan *p)
{
    const struct gdims *d = &p->d;
    enum moe_dtype dt = d->dtype;
    char prefix[GEN_NAME_MAX];
    int r;

    ADD(dt, INIT_NOISE, 0.02f, GEN_VOCAB, d->H, "%sembed_tokens.weight", d->mp);
    for (int i = 0; i < d->L; i++) {
        r = add_attention(p, i);
        if (r < 0)
            return r;
        if (i < d->first_dense || (i + 1) % d->moe_step != 0) {
            snprintf(prefix, sizeof(prefix), "%s%d.%s", d->lp, i,
                     d->arch == MOE_ARCH_LLAMA4 ? "feed_forward" : "mlp");
            r = add_ffn(p, prefix, "gate_proj", "up_proj", "down_proj", d->dense_ffn);
        } else {
            r = add_moe(p, i);
        }
        if (r < 0)
            return r;
        ADD(dt, INIT_ONES, 0, d->H, -1, "%s%d.input_layernorm.weight", d->lp, i);
        ADD(dt, INIT_ONES, 0, d->H, -1, "%s%d.post_attention_layernorm.weight", d->lp, i);
    }
    if (d->arch == MOE_ARCH_DEEPSEEK_V3 || d->arch == MOE_ARCH_KIMI_K2 ||
        d->arch == MOE_ARCH_GLM4_MOE) {
        /* A few tensors of the multi-token-prediction layer, as V3 ships them
         * at index num_hidden_layers; loaders must ignore them. */
        ADD(dt, INIT_NOISE, 0.02f, d->H, 2 * (int64_t)d->H, "%s%d.eh_proj.weight", d->lp, d->L);
        ADD(dt, INIT_ONES, 0, d->H, -1, "%s%d.enorm.weight", d->lp, d->L);
        ADD(dt, INIT_ONES, 0, d->H, -1, "%s%d.hnorm.weight", d->lp, d->L);
        ADD(dt, INIT_ONES, 0, d->H, -1, "%s%d.shared_head.norm.weight", d->lp, d->L);
    }
    ADD(dt, INIT_ONES, 0, d->H, -1, "%snorm.weight", d->mp);
    ADD(dt, INIT_NOISE, 0.02f, GEN_VOCAB, d->H, "lm_head.weight");
    return 0;
}

/* Tensors per layer, bounded before the plan is built. */
static uint64_t tensor_estimate(const struct gdims *d)
{
    return (uint64_t)(d->L + 1) * (3 * (uint64_t)d->E + 24) + 8;
}

/*
 * Shards: tensors in model order, a new shard starting where the running
 * total passes the next k/N of the bytes (at a tensor's midpoint), with at
 * least one tensor per shard.
 */
static void assign_shards(struct gplan *p)
{
    int N = p->d.n_shards, cur = 0;
    size_t in_cur = 0;
    double before = 0, total = (double)p->total_bytes;

    for (size_t i = 0; i < p->n; i++) {
        struct gtensor *t = &p->t[i];

        if (in_cur > 0 && cur < N - 1 &&
            (before + (double)t->nbytes / 2 > total * (cur + 1) / N ||
             p->n - i <= (size_t)(N - 1 - cur))) {
            cur++;
            in_cur = 0;
        }
        t->shard = cur;
        in_cur++;
        before += (double)t->nbytes;
    }
}

/* The reference writer's dtype order (its Dtype enum), for sorting. */
static int dtype_rank(enum moe_dtype t)
{
    static const int rank[MOE_DTYPE_COUNT] = {
        [MOE_DTYPE_BOOL] = 0,    [MOE_DTYPE_U8] = 1,      [MOE_DTYPE_I8] = 2,
        [MOE_DTYPE_F8_E5M2] = 3, [MOE_DTYPE_F8_E4M3] = 4, [MOE_DTYPE_I16] = 5,
        [MOE_DTYPE_U16] = 6,     [MOE_DTYPE_F16] = 7,     [MOE_DTYPE_BF16] = 8,
        [MOE_DTYPE_I32] = 9,     [MOE_DTYPE_U32] = 10,    [MOE_DTYPE_F32] = 11,
        [MOE_DTYPE_F64] = 12,    [MOE_DTYPE_I64] = 13,    [MOE_DTYPE_U64] = 14,
    };

    return rank[t];
}

static int cmp_file_order(const void *a, const void *b)
{
    const struct gtensor *x = *(const struct gtensor *const *)a;
    const struct gtensor *y = *(const struct gtensor *const *)b;
    int rx = dtype_rank(x->dtype), ry = dtype_rank(y->dtype);

    if (rx != ry)
        return rx > ry ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* ---- files ---------------------------------------------------------------- */

static int mkdir_p(const char *path, struct moe_error *err)
{
    char *p = strdup(path);
    struct stat st;
    int r = 0;

    if (!p)
        return moe_error_set(err, -ENOMEM, "out of memory");
    for (char *s = p + 1;; s++) {
        char c = *s;

        if (c != '/' && c != 0)
            continue;
        *s = 0;
        if (mkdir(p, 0755) < 0 && errno != EEXIST) {
            r = -errno;
            moe_error_set(err, r, "cannot create directory '%s': %s", p, strerror(-r));
            break;
        }
        *s = c;
        if (c == 0)
            break;
    }
    if (r == 0 && (stat(path, &st) < 0 || !S_ISDIR(st.st_mode)))
        r = moe_error_set(err, -ENOTDIR, "'%s' is not a directory", path);
    free(p);
    return r;
}

static bool is_checkpoint_file(const char *n)
{
    size_t len = strlen(n), sl = strlen(".safetensors");

    if (strcmp(n, "model.safetensors.index.json") == 0)
        return true;
    return strncmp(n, "model", 5) == 0 && len >= 5 + sl &&
           strcmp(n + len - sl, ".safetensors") == 0;
}

/* Removes model*.safetensors and the index (another sharding's leftovers). */
static int remove_checkpoint_files(const char *dir, struct moe_error *err)
{
    DIR *dp = opendir(dir);
    struct dirent *e;
    int r = 0;

    if (!dp)
        return moe_error_set(err, -errno, "cannot list '%s': %s", dir, strerror(errno));
    while ((e = readdir(dp))) {
        if (!is_checkpoint_file(e->d_name))
            continue;
        if (unlinkat(dirfd(dp), e->d_name, 0) < 0 && errno != ENOENT) {
            r = -errno;
            moe_error_set(err, r, "cannot remove '%s/%s': %s", dir, e->d_name, strerror(-r));
            break;
        }
    }
    closedir(dp);
    return r;
}

static char *path_join(const char *dir, const char *name)
{
    char *s;

    if (asprintf(&s, "%s/%s", dir, name) < 0)
        return NULL;
    return s;
}

/* Writes text (plus a newline) to dir/name. */
static int write_text(const char *dir, const char *name, const char *text, struct moe_error *err)
{
    char *path = path_join(dir, name);
    FILE *f;
    int r = 0;

    if (!path)
        return moe_error_set(err, -ENOMEM, "out of memory");
    f = fopen(path, "we");
    if (!f) {
        r = -errno;
        moe_error_set(err, r, "cannot create '%s': %s", path, strerror(-r));
        goto out;
    }
    if (fputs(text, f) < 0 || fputc('\n', f) == EOF)
        r = -(errno ? errno : EIO);
    if (fclose(f) != 0 && r == 0)
        r = -(errno ? errno : EIO);
    if (r < 0) {
        moe_error_set(err, r, "writing '%s': %s", path, strerror(-r));
        unlink(path);
    }
out:
    free(path);
    return r;
}

/* json_object_set_new that records a failure in *bad. */
static void jset(json_t *o, const char *key, json_t *v, bool *bad)
{
    if (!v || json_object_set_new(o, key, v) < 0)
        *bad = true;
}

static const char *torch_dtype(enum moe_dtype t)
{
    return t == MOE_DTYPE_BF16 ? "bfloat16" : t == MOE_DTYPE_F16 ? "float16" : "float32";
}

static json_t *config_json(const struct gdims *d)
{
    json_t *c = json_object(), *arr = json_array(), *layer_types = NULL;
    bool bad = !c || !arr;
    bool ds = has_mla(d->arch);

    if (bad)
        goto out;
    if (json_array_append_new(arr, json_string(arch_class[d->arch])) < 0)
        bad = true;
    jset(c, "architectures", arr, &bad);
    arr = NULL;
    jset(c, "model_type", json_string(arch_type[d->arch]), &bad);
    jset(c, "torch_dtype", json_string(torch_dtype(d->dtype)), &bad);
    if (d->fp8) {
        /* as DeepSeek-V3 and the Qwen3 FP8 releases write it */
        json_t *q = json_object(), *bs = json_array();

        if (!q || !bs || json_array_append_new(bs, json_integer(GEN_FP8_BLOCK)) < 0 ||
            json_array_append_new(bs, json_integer(GEN_FP8_BLOCK)) < 0)
            bad = true;
        jset(q, "activation_scheme", json_string("dynamic"), &bad);
        jset(q, "fmt", json_string("e4m3"), &bad);
        jset(q, "quant_method", json_string("fp8"), &bad);
        jset(q, "weight_block_size", bs, &bad);
        jset(c, "quantization_config", q, &bad);
    }
    if (d->mxfp4) {
        /* as gpt-oss-20b's and -120b's config.json */
        json_t *q = json_object(), *nc = json_array();
        static const char *const keep[] = {"model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"};

        if (!q || !nc)
            bad = true;
        for (size_t k = 0; nc && k < MOE_ARRAY_SIZE(keep); k++)
            if (json_array_append_new(nc, json_string(keep[k])) < 0)
                bad = true;
        jset(q, "modules_to_not_convert", nc, &bad);
        jset(q, "quant_method", json_string("mxfp4"), &bad);
        jset(c, "quantization_config", q, &bad);
    }
    jset(c, "hidden_size", json_integer(d->H), &bad);
    jset(c, "num_hidden_layers", json_integer(d->L), &bad);
    jset(c, "num_attention_heads", json_integer(d->n_heads), &bad);
    jset(c, "num_key_value_heads", json_integer(d->n_kv), &bad);
    jset(c, "vocab_size", json_integer(GEN_VOCAB), &bad);
    jset(c, "max_position_embeddings", json_integer(4096), &bad);
    jset(c, "tie_word_embeddings", json_false(), &bad);
    jset(c, "hidden_act", json_string("silu"), &bad);
    jset(c, "initializer_range", json_real(0.02), &bad);
    jset(c, "use_cache", json_true(), &bad);
    jset(c, "attention_dropout", json_real(0.0), &bad);
    jset(c, "bos_token_id", json_integer(1), &bad);
    jset(c, "eos_token_id", json_integer(2), &bad);
    jset(c, "num_experts_per_tok", json_integer(d->K), &bad);
    jset(c, "output_router_logits", json_false(), &bad);
    if (!ds && (d->arch == MOE_ARCH_MIXTRAL || d->arch == MOE_ARCH_QWEN3_MOE ||
                qwen_gated_attn(d->arch) || d->n_heads * d->head_dim != d->H))
        jset(c, "head_dim", json_integer(d->head_dim), &bad);

    switch (d->arch) {
    case MOE_ARCH_MIXTRAL:
        jset(c, "intermediate_size", json_integer(d->F), &bad);
        jset(c, "num_local_experts", json_integer(d->E), &bad);
        jset(c, "rms_norm_eps", json_real(1e-5), &bad);
        jset(c, "rope_theta", json_real(1e6), &bad);
        jset(c, "router_aux_loss_coef", json_real(0.02), &bad);
        jset(c, "router_jitter_noise", json_real(0.0), &bad);
        jset(c, "sliding_window", json_null(), &bad);
        break;
    case MOE_ARCH_QWEN2_MOE:
    case MOE_ARCH_QWEN3_MOE:
        jset(c, "intermediate_size", json_integer(d->dense_ffn), &bad);
        jset(c, "moe_intermediate_size", json_integer(d->F), &bad);
        jset(c, "num_experts", json_integer(d->E), &bad);
        jset(c, "decoder_sparse_step", json_integer(1), &bad);
        jset(c, "mlp_only_layers", json_array(), &bad);
        jset(c, "rms_norm_eps", json_real(1e-6), &bad);
        jset(c, "rope_theta", json_real(1e6), &bad);
        jset(c, "router_aux_loss_coef", json_real(0.001), &bad);
        jset(c, "use_sliding_window", json_false(), &bad);
        jset(c, "sliding_window", json_null(), &bad);
        jset(c, "max_window_layers", json_integer(d->L), &bad);
        if (d->arch == MOE_ARCH_QWEN2_MOE) {
            jset(c, "shared_expert_intermediate_size", json_integer(d->shared_ffn), &bad);
            jset(c, "norm_topk_prob", json_false(), &bad);
        } else {
            jset(c, "norm_topk_prob", json_true(), &bad);
            jset(c, "attention_bias", json_false(), &bad);
        }
        break;
    case MOE_ARCH_QWEN3_NEXT:
    case MOE_ARCH_QWEN3_5_MOE:
        /* Their linear-attention layers are the caller's: these checkpoints
         * say every layer is full attention, which is what they hold. */
        layer_types = json_array();
        for (int i = 0; layer_types && i < d->L; i++)
            if (json_array_append_new(layer_types, json_string("full_attention")) < 0)
                bad = true;
        jset(c, "layer_types", layer_types, &bad);
        layer_types = NULL;
        jset(c, "moe_intermediate_size", json_integer(d->F), &bad);
        jset(c, "shared_expert_intermediate_size", json_integer(d->shared_ffn), &bad);
        jset(c, "num_experts", json_integer(d->E), &bad);
        jset(c, "rms_norm_eps", json_real(1e-6), &bad);
        jset(c, "router_aux_loss_coef", json_real(0.001), &bad);
        jset(c, "attention_bias", json_false(), &bad);
        jset(c, "partial_rotary_factor", json_real(0.25), &bad);
        jset(c, "linear_conv_kernel_dim", json_integer(4), &bad);
        jset(c, "linear_key_head_dim", json_integer(32), &bad);
        jset(c, "linear_value_head_dim", json_integer(32), &bad);
        jset(c, "linear_num_key_heads", json_integer(2), &bad);
        jset(c, "linear_num_value_heads", json_integer(4), &bad);
        if (d->arch == MOE_ARCH_QWEN3_NEXT) {
            jset(c, "intermediate_size", json_integer(d->dense_ffn), &bad);
            jset(c, "decoder_sparse_step", json_integer(1), &bad);
            jset(c, "mlp_only_layers", json_array(), &bad);
            jset(c, "norm_topk_prob", json_true(), &bad);
        }
        jset(c, "rope_theta", json_real(1e7), &bad);
        break;
    case MOE_ARCH_OLMOE:
        jset(c, "intermediate_size", json_integer(d->F), &bad);
        jset(c, "num_experts", json_integer(d->E), &bad);
        jset(c, "norm_topk_prob", json_false(), &bad);
        jset(c, "attention_bias", json_false(), &bad);
        jset(c, "clip_qkv", json_null(), &bad);
        jset(c, "rms_norm_eps", json_real(1e-5), &bad);
        jset(c, "rope_theta", json_real(1e4), &bad);
        jset(c, "router_aux_loss_coef", json_real(0.01), &bad);
        jset(c, "pad_token_id", json_integer(1), &bad);
        break;
    case MOE_ARCH_GLM4_MOE:
        /* GLM-4.5's routing keys; it has no scoring_func or topk_method. */
        jset(c, "intermediate_size", json_integer(d->dense_ffn), &bad);
        jset(c, "moe_intermediate_size", json_integer(d->F), &bad);
        jset(c, "n_routed_experts", json_integer(d->E), &bad);
        jset(c, "n_shared_experts", json_integer(d->n_shared), &bad);
        jset(c, "n_group", json_integer(d->n_group), &bad);
        jset(c, "topk_group", json_integer(d->topk_group), &bad);
        jset(c, "norm_topk_prob", json_true(), &bad);
        jset(c, "routed_scaling_factor", json_real(2.5), &bad);
        jset(c, "first_k_dense_replace", json_integer(d->first_dense), &bad);
        jset(c, "num_nextn_predict_layers", json_integer(1), &bad);
        jset(c, "attention_bias", json_true(), &bad);
        jset(c, "use_qk_norm", json_false(), &bad);
        jset(c, "partial_rotary_factor", json_real(0.5), &bad);
        jset(c, "rms_norm_eps", json_real(1e-5), &bad);
        jset(c, "rope_theta", json_real(1e6), &bad);
        break;
    case MOE_ARCH_DEEPSEEK_V2:
        /* DeepSeek-V2's: softmax, group_limited_greedy, never renormalised. */
        jset(c, "intermediate_size", json_integer(d->dense_ffn), &bad);
        jset(c, "moe_intermediate_size", json_integer(d->F), &bad);
        jset(c, "n_routed_experts", json_integer(d->E), &bad);
        jset(c, "n_shared_experts", json_integer(d->n_shared), &bad);
        jset(c, "n_group", json_integer(d->n_group), &bad);
        jset(c, "topk_group", json_integer(d->topk_group), &bad);
        jset(c, "topk_method",
             json_string(d->n_group > 1 && d->topk_group < d->n_group ? "group_limited_greedy"
                                                                      : "greedy"),
             &bad);
        jset(c, "scoring_func", json_string("softmax"), &bad);
        jset(c, "norm_topk_prob", json_false(), &bad);
        jset(c, "routed_scaling_factor", json_real(16.0), &bad);
        jset(c, "first_k_dense_replace", json_integer(d->first_dense), &bad);
        jset(c, "moe_layer_freq", json_integer(1), &bad);
        jset(c, "q_lora_rank", json_integer(DS_Q_LORA), &bad);
        jset(c, "kv_lora_rank", json_integer(DS_KV_LORA), &bad);
        jset(c, "qk_rope_head_dim", json_integer(DS_ROPE_DIM), &bad);
        jset(c, "qk_nope_head_dim", json_integer(DS_NOPE_DIM), &bad);
        jset(c, "v_head_dim", json_integer(DS_V_DIM), &bad);
        jset(c, "attention_bias", json_false(), &bad);
        jset(c, "rms_norm_eps", json_real(1e-6), &bad);
        jset(c, "rope_theta", json_real(1e4), &bad);
        break;
    case MOE_ARCH_LLAMA4: {
        /* As transformers' Llama4TextConfig writes it: moe_layers spelled
         * out beside the step it came from. */
        json_t *ml = json_array();

        for (int i = 0; ml && i < d->L; i++)
            if ((i + 1) % d->moe_step == 0 && json_array_append_new(ml, json_integer(i)) < 0)
                bad = true;
        jset(c, "moe_layers", ml, &bad);
        jset(c, "interleave_moe_layer_step", json_integer(d->moe_step), &bad);
        jset(c, "intermediate_size", json_integer(d->F), &bad);
        jset(c, "intermediate_size_mlp", json_integer(d->dense_ffn), &bad);
        jset(c, "num_local_experts", json_integer(d->E), &bad);
        jset(c, "head_dim", json_integer(d->head_dim), &bad);
        jset(c, "rms_norm_eps", json_real(1e-5), &bad);
        jset(c, "rope_theta", json_real(5e5), &bad);
        jset(c, "use_qk_norm", json_true(), &bad);
        jset(c, "attention_bias", json_false(), &bad);
        jset(c, "attention_chunk_size", json_integer(8192), &bad);
        jset(c, "router_aux_loss_coef", json_real(0.001), &bad);
        jset(c, "router_jitter_noise", json_real(0.0), &bad);
        break;
    }
    case MOE_ARCH_GPT_OSS:
        /* As the released gpt-oss config.json (which has no swiglu_alpha:
         * transformers' default 1.702 applies); layer_types alternate. */
        layer_types = json_array();
        for (int i = 0; layer_types && i < d->L; i++)
            if (json_array_append_new(
                    layer_types, json_string(i % 2 ? "full_attention" : "sliding_attention")) < 0)
                bad = true;
        jset(c, "layer_types", json_incref(layer_types), &bad);
        jset(c, "intermediate_size", json_integer(d->F), &bad);
        jset(c, "num_local_experts", json_integer(d->E), &bad);
        jset(c, "experts_per_token", json_integer(d->K), &bad);
        jset(c, "head_dim", json_integer(d->head_dim), &bad);
        jset(c, "swiglu_limit", json_real(7.0), &bad);
        jset(c, "attention_bias", json_true(), &bad);
        jset(c, "sliding_window", json_integer(128), &bad);
        jset(c, "rms_norm_eps", json_real(1e-5), &bad);
        jset(c, "rope_theta", json_real(150000.0), &bad);
        jset(c, "router_aux_loss_coef", json_real(0.9), &bad);
        break;
    case MOE_ARCH_DEEPSEEK_V3:
    case MOE_ARCH_KIMI_K2:
    default:
        jset(c, "intermediate_size", json_integer(d->dense_ffn), &bad);
        jset(c, "moe_intermediate_size", json_integer(d->F), &bad);
        jset(c, "n_routed_experts", json_integer(d->E), &bad);
        jset(c, "n_shared_experts", json_integer(d->n_shared), &bad);
        jset(c, "n_group", json_integer(d->n_group), &bad);
        jset(c, "topk_group", json_integer(d->topk_group), &bad);
        jset(c, "norm_topk_prob", json_true(), &bad);
        jset(c, "routed_scaling_factor", json_real(d->arch == MOE_ARCH_KIMI_K2 ? 2.827 : 2.5),
             &bad);
        jset(c, "scoring_func", json_string("sigmoid"), &bad);
        jset(c, "topk_method", json_string("noaux_tc"), &bad);
        jset(c, "first_k_dense_replace", json_integer(d->first_dense), &bad);
        jset(c, "moe_layer_freq", json_integer(1), &bad);
        jset(c, "num_nextn_predict_layers", json_integer(1), &bad);
        jset(c, "ep_size", json_integer(1), &bad);
        jset(c, "q_lora_rank", json_integer(DS_Q_LORA), &bad);
        jset(c, "kv_lora_rank", json_integer(DS_KV_LORA), &bad);
        jset(c, "qk_rope_head_dim", json_integer(DS_ROPE_DIM), &bad);
        jset(c, "qk_nope_head_dim", json_integer(DS_NOPE_DIM), &bad);
        jset(c, "v_head_dim", json_integer(DS_V_DIM), &bad);
        jset(c, "attention_bias", json_false(), &bad);
        jset(c, "rope_scaling", json_null(), &bad);
        jset(c, "rms_norm_eps", json_real(1e-6), &bad);
        jset(c, "rope_theta", json_real(1e4), &bad);
        jset(c, "aux_loss_alpha", json_real(0.001), &bad);
        jset(c, "seq_aux", json_true(), &bad);
        break;
    }
    if (!bad && d->multimodal) {
        /* The released Qwen3.5-MoE: the text model's keys in text_config
         * (its own model_type), the class and dtype at the top. */
        json_t *top = json_object();

        bad = !top;
        jset(top, "architectures", json_incref(json_object_get(c, "architectures")), &bad);
        jset(top, "model_type", json_string(arch_type[d->arch]), &bad);
        jset(top, "torch_dtype", json_string(torch_dtype(d->dtype)), &bad);
        jset(top, "tie_word_embeddings", json_false(), &bad);
        json_object_del(c, "architectures");
        jset(c, "model_type", json_string("qwen3_5_moe_text"), &bad);
        jset(top, "text_config", c, &bad);
        c = top;
    }
out:
    json_decref(arr);
    json_decref(layer_types);
    if (bad) {
        json_decref(c);
        return NULL;
    }
    return c;
}

/* Dumps j (sorted keys, 2-space indent, as transformers) to dir/name; j
 * (NULL: out of memory) stays the caller's. */
static int write_json(const char *dir, const char *name, json_t *j, struct moe_error *err)
{
    char *text;
    int r;

    if (!j)
        return moe_error_set(err, -ENOMEM, "out of memory");
    text = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(10));
    if (!text)
        return moe_error_set(err, -ENOMEM, "out of memory");
    r = write_text(dir, name, text, err);
    free(text);
    return r;
}

static void shard_name(const struct gdims *d, int i, char *buf, size_t len)
{
    if (d->n_shards == 1)
        snprintf(buf, len, "model.safetensors");
    else
        snprintf(buf, len, "model-%05d-of-%05d.safetensors", i + 1, d->n_shards);
}

static int write_index(const char *dir, const struct gplan *p, struct moe_error *err)
{
    json_t *root = json_object(), *meta = json_object(), *map = json_object();
    char name[64];
    bool bad = !root || !meta || !map;
    int r;

    for (size_t i = 0; !bad && i < p->n; i++) {
        shard_name(&p->d, p->t[i].shard, name, sizeof(name));
        jset(map, p->t[i].name, json_string(name), &bad);
    }
    jset(meta, "total_size", json_integer((json_int_t)p->total_bytes), &bad);
    if (!bad) {
        jset(root, "metadata", meta, &bad);
        meta = NULL;
        jset(root, "weight_map", map, &bad);
        map = NULL;
    }
    r = bad ? moe_error_set(err, -ENOMEM, "out of memory")
            : write_json(dir, "model.safetensors.index.json", root, err);
    json_decref(meta);
    json_decref(map);
    json_decref(root);
    return r;
}

static int write_shard(const char *dir, const struct gplan *p, int shard, struct gen_buf *b,
                       struct moe_error *err)
{
    struct moe_st_writer *w = NULL;
    const struct gtensor **list = NULL;
    char name[64], *path;
    size_t n = 0;
    int r;

    shard_name(&p->d, shard, name, sizeof(name));
    path = path_join(dir, name);
    if (!path)
        return moe_error_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < p->n; i++)
        n += p->t[i].shard == shard;
    list = calloc(MOE_MAX(n, 1), sizeof(*list));
    if (!list) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    n = 0;
    for (size_t i = 0; i < p->n; i++)
        if (p->t[i].shard == shard)
            list[n++] = &p->t[i];
    qsort(list, n, sizeof(*list), cmp_file_order);

    r = moe_st_writer_init(path, &w, err);
    if (r < 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        const struct gtensor *t = list[i];

        r = moe_st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, err);
        if (r < 0)
            goto out;
    }
    r = moe_st_writer_begin(w, err);
    for (size_t i = 0; r == 0 && i < n; i++)
        r = write_tensor(w, list[i], &p->d, b, err);
    if (r == 0)
        r = moe_st_writer_finish(w, err);
out:
    moe_st_writer_free(w);
    free(list);
    free(path);
    return r;
}

/* Refuses a checkpoint that cannot fit in the free space of dir. */
static int check_space(const char *dir, const struct gplan *p, struct moe_error *err)
{
    struct statvfs sv;
    uint64_t avail, need;

    if (statvfs(dir, &sv) < 0)
        return 0; /* unknown: let the writes tell */
    avail = (uint64_t)sv.f_bavail * (uint64_t)sv.f_frsize;
    /* Data plus headers (~128 bytes of JSON per tensor) and config. */
    need = p->total_bytes + (uint64_t)p->n * 128 + 65536;
    if (need > avail)
        return moe_error_set(err, -ENOSPC,
                             "the checkpoint needs %.2f GB but '%s' has %.2f GB free; use "
                             "smaller sizes",
                             (double)need / 1e9, dir, (double)avail / 1e9);
    return 0;
}

int moe_genmodel_write(const struct moe_genmodel_opts *o, struct moe_error *err)
{
    struct gplan p = {0};
    struct gen_buf b = {0};
    json_t *cfg;
    int r;

    if (!o->out_dir || !*o->out_dir)
        return moe_error_set(err, -EINVAL, "no output directory");
    r = resolve_dims(o, &p.d, err);
    if (r < 0)
        return r;
    if (tensor_estimate(&p.d) > GEN_MAX_TENSORS)
        return moe_error_set(err, -EINVAL,
                             "%d layers of %d experts make over %u tensors: use fewer", p.d.L,
                             p.d.E, GEN_MAX_TENSORS);
    r = build_plan(&p);
    if (r < 0) {
        moe_error_set(err, r, "cannot plan the checkpoint: %s", strerror(-r));
        goto out;
    }
    if ((size_t)p.d.n_shards > p.n) {
        r = moe_error_set(err, -EINVAL, "%d shards but only %zu tensors", p.d.n_shards, p.n);
        goto out;
    }
    assign_shards(&p);

    b.vals = malloc(GEN_CHUNK * sizeof(float));
    b.bytes = malloc(GEN_CHUNK * sizeof(float));
    if (!b.vals || !b.bytes) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    r = mkdir_p(o->out_dir, err);
    if (r < 0)
        goto out;
    r = remove_checkpoint_files(o->out_dir, err);
    if (r < 0)
        goto out;
    r = check_space(o->out_dir, &p, err);
    if (r < 0)
        goto out;

    b.o = o;
    b.pr.bytes_total = p.total_bytes;
    b.pr.n_files = 1 + p.d.n_shards + (p.d.n_shards > 1);
    b.pr.file = 1;
    report(&b);
    cfg = config_json(&p.d);
    r = write_json(o->out_dir, "config.json", cfg, err);
    json_decref(cfg);
    if (r < 0)
        goto out;
    for (int s = 0; s < p.d.n_shards; s++) {
        b.pr.file = 2 + s;
        report(&b);
        r = write_shard(o->out_dir, &p, s, &b, err);
        if (r < 0)
            goto out_remove;
        /* The shard's bytes are done, however its tensors were written. */
        b.pr.bytes_done = 0;
        for (size_t i = 0; i < p.n; i++)
            if (p.t[i].shard <= s)
                b.pr.bytes_done += p.t[i].nbytes;
        report(&b);
    }
    if (p.d.n_shards > 1) {
        b.pr.file = b.pr.n_files;
        report(&b);
        r = write_index(o->out_dir, &p, err);
        if (r < 0)
            goto out_remove;
    }
    report(&b); /* done: bytes_done == bytes_total, file == n_files */
    goto out;
out_remove:
    /* Leave no partial checkpoint: the loader would refuse it anyway. */
    remove_checkpoint_files(o->out_dir, NULL);
out:
    free(b.vals);
    free(b.bytes);
    free(p.t);
    return r;
}
