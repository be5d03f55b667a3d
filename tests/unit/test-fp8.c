/*
 * FP8 checkpoints as DeepSeek-V3 and Qwen3 FP8 publish them, end to end:
 * moe_genmodel_write with dtype F8_E4M3 writes the published layout
 * (quantization_config, e4m3 linear weights, a float32 weight_scale_inv
 * per 128 x 128 block beside each); the loader finds every scale with its
 * shape; a layer forward (routed experts through the cache and the pager,
 * the shared expert) matches an fp64 reference computed from the bytes in
 * the file, dequantized (1e-5 relative); the error against the same model
 * in bf16 is reported.  Bad input is refused naming the tensor: a scale of
 * the wrong shape, dtype or missing, NaN or infinite scales (at page-in),
 * unsupported quantization_config (method, fmt, block size, no block size),
 * FP8 weights without a quantization_config, a layer mixing formats.
 */
#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "common.h"
#include "genmodel.h"
#include "layer.h"
#include "model.h"
#include "quant.h"
#include "safetensors.h"
#include "st_writer.h"
#include "st_rewrite.h"
#include "tests.h"

#define H 256
#define F 160 /* two FP8 row blocks, the second partial */
#define E 8
#define T 7

static struct moe_backend *be;

static char *gen(enum moe_dtype dt, const char *tag)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *dir = test_tmpdir(tag);

    moe_genmodel_defaults(MOE_ARCH_DEEPSEEK_V3, &o);
    o.out_dir = dir;
    o.n_layers = 3;
    o.n_experts = E;
    o.top_k = 2;
    o.hidden = H;
    o.ffn = F;
    o.n_shared = 1;
    o.dtype = dt;
    o.seed = 5;
    if (moe_genmodel_write(&o, &err) < 0)
        FAIL("genmodel: %s", err.msg);
    return dir;
}

/* ---- the good checkpoint -------------------------------------------------------------- */

#define EXP(l, e, p) "model.layers." #l ".mlp.experts." #e "." #p "_proj.weight"

/* An expert's matrix from the file, dequantized in fp64. */
static double *deq(const struct moe_model *m, const struct moe_tensor_ref *w,
                   const struct moe_tensor_ref *s, const struct moe_quant_fmt *q)
{
    uint8_t *wb = malloc(w->nbytes), *sb = malloc(s->nbytes);
    double *out = malloc((size_t)w->rows * w->cols * sizeof(double));
    struct moe_error err = {0};

    ASSERT_TRUE(wb && sb && out);
    ASSERT_EQ(moe_model_read(m, w, wb, &err), 0);
    ASSERT_EQ(moe_model_read(m, s, sb, &err), 0);
    for (int64_t r = 0; r < w->rows; r++)
        moe_quant_dequant_row_f64(q, wb, sb, w->rows, w->cols, r, out + r * w->cols);
    free(wb);
    free(sb);
    return out;
}

/* out += s * expert(x) in fp64 from the file's bytes. */
static void ref_expert(const struct moe_model *m, const struct moe_expert_ref *x, const float *xt,
                       double s, double *out)
{
    int64_t f_rows = x->gate.rows;
    double *g = deq(m, &x->gate, &x->gate_s, &x->quant), *u = deq(m, &x->up, &x->up_s, &x->quant),
           *d = deq(m, &x->down, &x->down_s, &x->quant);
    double *act = malloc((size_t)f_rows * sizeof(double));

    ASSERT_TRUE(act != NULL);
    for (int64_t f = 0; f < f_rows; f++) {
        double a = 0, b = 0;

        for (int64_t k = 0; k < H; k++) {
            a += g[f * H + k] * xt[k];
            b += u[f * H + k] * xt[k];
        }
        act[f] = a / (1 + exp(-a)) * b;
    }
    for (int64_t h = 0; h < H; h++) {
        double v = 0;

        for (int64_t f = 0; f < f_rows; f++)
            v += d[h * f_rows + f] * act[f];
        out[h] += s * v;
    }
    free(g);
    free(u);
    free(d);
    free(act);
}

static void test_good(void)
{
    char *dir = gen(MOE_DTYPE_F8_E4M3, "fp8"), *bdir = gen(MOE_DTYPE_BF16, "fp8-bf16");
    struct moe_model *m, *mb;
    struct moe_engine *eng, *engb;
    struct moe_error err = {0};
    float x[T * H], y[T * H], yb[T * H], wts[T * 2];
    int32_t ids[T * 2];
    double ref[T * H];
    uint64_t seed = 3;

    if (moe_model_open(dir, &m, &err) < 0)
        FAIL("%s", err.msg);
    ASSERT_EQ(m->cfg.quant.q, MOE_QUANT_FP8);
    ASSERT_EQ(m->expert_quant.q, MOE_QUANT_FP8);
    ASSERT_EQ(m->expert_quant.brows, 128);
    ASSERT_EQ(m->expert_quant.bcols, 128);
    ASSERT_EQ(m->expert_dtype, MOE_DTYPE_F8_E4M3);
    ASSERT_EQ(m->cfg.dtype, MOE_DTYPE_BF16); /* torch_dtype, as released */
    {
        const struct moe_expert_ref *x0 = &m->layers[1].experts[3];

        ASSERT_STREQ(x0->gate_s.name, EXP(1, 3, gate) "_scale_inv");
        ASSERT_EQ(x0->gate_s.rows, 2); /* ceil(160 / 128) */
        ASSERT_EQ(x0->gate_s.cols, 2);
        ASSERT_EQ(x0->down_s.rows, 2);
        ASSERT_EQ(x0->down_s.cols, 2); /* ceil(160 / 128) */
        ASSERT_EQ(x0->nbytes, 3 * (uint64_t)H * F + 3 * 4 * 4);
        ASSERT_EQ(m->expert_bytes, x0->nbytes);
        ASSERT_EQ(m->layers[1].shared.quant.q, MOE_QUANT_FP8);
        /* the router stays bf16 */
        ASSERT_EQ(m->layers[1].router.dtype, MOE_DTYPE_BF16);
    }
    if (moe_model_open(bdir, &mb, &err) < 0)
        FAIL("%s", err.msg);
    ASSERT_EQ(moe_engine_init(m, be, &eng), 0);
    ASSERT_EQ(moe_engine_init(mb, be, &engb), 0);
    for (int i = 0; i < T * H; i++)
        x[i] = test_rand_f32(&seed) * 2;
    for (int layer = 1; layer < 3; layer++) {
        double e;

        if (moe_layer_forward(eng, layer, x, T, NULL, NULL, y, ids, wts, NULL, &err) < 0)
            FAIL("forward: %s", err.msg);
        memset(ref, 0, sizeof(ref));
        for (int t = 0; t < T; t++) {
            for (int k = 0; k < 2; k++)
                ref_expert(m, &m->layers[layer].experts[ids[t * 2 + k]], x + t * H, wts[t * 2 + k],
                           ref + t * H);
            ref_expert(m, &m->layers[layer].shared, x + t * H, 1.0, ref + t * H);
        }
        e = test_rel_l2_f32(y, ref, T * H);
        if (!(e <= 1e-5))
            FAIL("layer %d: relative error %.3g against the fp64 reference", layer, e);
        /* the same routing on the bf16 model: the quantization's error */
        ASSERT_EQ(moe_layer_forward(engb, layer, x, T, ids, wts, yb, NULL, NULL, NULL, &err), 0);
        {
            double num = 0, den = 0;

            for (int i = 0; i < T * H; i++) {
                num += ((double)y[i] - yb[i]) * ((double)y[i] - yb[i]);
                den += (double)yb[i] * yb[i];
            }
            printf("layer %d: fp8 vs fp64 reference %.2g; fp8 vs the bf16 layer %.4f "
                   "(reported)\n",
                   layer, e, sqrt(num / den));
            /* e4m3 keeps 3 mantissa bits: a few percent, not more */
            ASSERT_TRUE(sqrt(num / den) < 0.1);
        }
    }
    moe_engine_free(eng);
    moe_engine_free(engb);
    moe_model_free(m);
    moe_model_free(mb);
    test_rmtree(dir);
    test_rmtree(bdir);
    free(dir);
    free(bdir);
}

/* ---- bad input --------------------------------------------------------------------- */

static void bad_file(const char *what, void (*mutate)(struct rfile *f), const char *needle)
{
    char *dir = gen(MOE_DTYPE_F8_E4M3, "fp8-bad");
    struct rfile f;

    rfile_read(dir, &f);
    mutate(&f);
    rfile_write(dir, &f);
    rfile_free(&f);
    expect_open_fails(dir, what, needle);
    test_rmtree(dir);
    free(dir);
}

static void scale_shape(struct rfile *f)
{
    rfind(f, EXP(2, 5, up) "_scale_inv")->shape[1] = 1;
    rfind(f, EXP(2, 5, up) "_scale_inv")->nbytes = 8;
}

static void scale_missing(struct rfile *f)
{
    rfind(f, EXP(1, 0, down) "_scale_inv")->dropped = true;
}

static void scale_bf16(struct rfile *f)
{
    struct rt *t = rfind(f, EXP(1, 2, gate) "_scale_inv");

    t->dtype = MOE_DTYPE_BF16;
    t->nbytes /= 2;
}

static void scale_1d(struct rfile *f)
{
    struct rt *t = rfind(f, EXP(1, 1, gate) "_scale_inv");

    t->ndim = 1;
    t->shape[0] = 4;
}

/* expert 4's gate in bf16, beside its fp8 up and down */
static void mixed_in_expert(struct rfile *f)
{
    struct rt *t = rfind(f, EXP(2, 4, gate));
    uint8_t *d = calloc(t->nbytes * 2, 1);

    ASSERT_TRUE(d != NULL);
    free(t->data);
    t->data = d;
    t->nbytes *= 2;
    t->dtype = MOE_DTYPE_BF16;
}

/* expert 6 wholly bf16 while the others are fp8 */
static void mixed_in_layer(struct rfile *f)
{
    static const char *const parts[3] = {EXP(1, 6, gate), EXP(1, 6, up), EXP(1, 6, down)};

    for (int i = 0; i < 3; i++) {
        struct rt *t = rfind(f, parts[i]);
        uint8_t *d = calloc(t->nbytes * 2, 1);

        ASSERT_TRUE(d != NULL);
        free(t->data);
        t->data = d;
        t->nbytes *= 2;
        t->dtype = MOE_DTYPE_BF16;
    }
}

/* A scale of one expert set to v, found at its first page-in. */
static void bad_scale_value(float v, const char *needle)
{
    char *dir = gen(MOE_DTYPE_F8_E4M3, "fp8-nan");
    struct rfile f;
    struct moe_model *m;
    struct moe_engine *eng;
    struct moe_error err = {0};
    float x[H], y[H];
    int32_t ids[2] = {3, 4};
    float w[2] = {0.5f, 0.5f};
    int r;

    rfile_read(dir, &f);
    memcpy(rfind(&f, EXP(1, 4, down) "_scale_inv")->data + 4 * 3, &v, 4);
    rfile_write(dir, &f);
    rfile_free(&f);
    /* opening reads headers only; the expert's first use checks its scales */
    if (moe_model_open(dir, &m, &err) < 0)
        FAIL("%s", err.msg);
    ASSERT_EQ(moe_engine_init(m, be, &eng), 0);
    for (int i = 0; i < H; i++)
        x[i] = 1.0f;
    r = moe_layer_forward(eng, 1, x, 1, ids, w, y, NULL, NULL, NULL, &err);
    if (r != -EINVAL)
        FAIL("scale %g: expected -EINVAL, got %d (%s)", (double)v, r, err.msg);
    ASSERT_CONTAINS(err.msg, EXP(1, 4, down) "_scale_inv': scale 3 is ");
    ASSERT_CONTAINS(err.msg, needle);
    printf("refused (scale %g): %s\n", (double)v, err.msg);
    /* the other experts still serve */
    ids[1] = 5;
    ASSERT_EQ(moe_layer_forward(eng, 1, x, 1, ids, w, y, NULL, NULL, NULL, &err), 0);
    moe_engine_free(eng);
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
}

static void bad_config(const char *what, const char *key, json_t *v, const char *needle)
{
    char *dir = gen(MOE_DTYPE_F8_E4M3, "fp8-cfg");

    set_quant(dir, key, v);
    expect_open_fails(dir, what, needle);
    test_rmtree(dir);
    free(dir);
}

static void test_bad(void)
{
    bad_file("scale shape", scale_shape,
             "tensor '" EXP(2, 5, up) "_scale_inv': shape [2, 1]: expected [2, 2], one scale per "
                                      "128 x 128 block of '" EXP(2, 5, up) "' [160, 256]");
    bad_file("scale 1-D", scale_1d, "tensor '" EXP(1, 1, gate) "_scale_inv': shape [4]");
    bad_file("scale missing", scale_missing,
             "no tensor '" EXP(1, 0, down) "_scale_inv': expected the fp8 scales of '" EXP(
                 1, 0, down) "'");
    bad_file("scale dtype", scale_bf16,
             "tensor '" EXP(1, 2, gate) "_scale_inv': dtype BF16: expected F32 scales");
    bad_file("mixed in an expert", mixed_in_expert,
             "tensor '" EXP(2, 4, up) "': dtype F8_E4M3, but " EXP(
                 2, 4, gate) " is BF16: expected one dtype (one format)");
    bad_file("mixed in a layer", mixed_in_layer,
             "tensor '" EXP(1, 6, gate) "': dtype BF16, but the model's other experts are "
                                        "F8_E4M3: expected one dtype (one format)");
    bad_scale_value(NAN, "nan");
    bad_scale_value(INFINITY, "inf");
    bad_scale_value(-2.0f, "-2");

    bad_config("no quantization_config", NULL, NULL,
               "dtype F8_E4M3 but config.json has no quantization_config");
    bad_config("block size", "weight_block_size", json_pack("[i, i]", 128, 100),
               "weight_block_size [128, 100]: unsupported block size");
    bad_config("block size 0", "weight_block_size", json_pack("[i, i]", 0, 128),
               "unsupported block size");
    bad_config("block size shape", "weight_block_size", json_pack("[i]", 128),
               "weight_block_size is [128]: expected two integers");
    bad_config("per-tensor", "weight_block_size", NULL, "per-tensor FP8 scales are not supported");
    bad_config("method", "quant_method", json_string("gptq"),
               "quant_method is \"gptq\": unsupported");
    bad_config("fmt", "fmt", json_string("e5m2"), "fmt is \"e5m2\": unsupported");
}

int main(void)
{
    struct moe_cpu_config cfg = {.n_threads = 2};
    struct moe_error err = {0};

    ASSERT_EQ(moe_backend_cpu_init(&cfg, &be, &err), 0);
    test_good();
    test_bad();
    moe_backend_free(be);
    printf("fp8: ok\n");
    return 0;
}
