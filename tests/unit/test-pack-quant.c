/*
 * Packed stores with quantized experts (moectl pack --quantize int8|int4):
 * from bf16 and FP8 checkpoints of the five families, every expert's
 * stored values and scales are the quantization of the checkpoint's
 * (moe_pack_verify against the checkpoint re-derives them), the store
 * serves a layer that matches an fp64 reference on its dequantized bytes
 * (1e-5 relative), and the error against the bf16 layer is reported per
 * format (fp8 as published, int8, int4).  Llama 4's and gpt-oss's
 * transposed experts quantized along their plain rows.  Bad input: a group that does not
 * divide the columns, an already quantized source, a bad "quantization"
 * in moe-pack.json, a flipped byte (checksums), a store checked against
 * another checkpoint.
 */
#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "common.h"
#include "dtype.h"
#include "genmodel.h"
#include "layer.h"
#include "model.h"
#include "pack.h"
#include "quant.h"
#include "tests.h"

#define T 5

static struct moe_backend *be;

static char *gen(enum moe_arch a, enum moe_dtype dt, uint64_t seed, const char *tag)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *dir = test_tmpdir(tag);

    moe_genmodel_defaults(a, &o);
    o.out_dir = dir;
    o.n_layers = a == MOE_ARCH_DEEPSEEK_V3 ? 2 : 1;
    o.n_experts = 8;
    o.top_k = 2;
    o.hidden = 256;
    o.ffn = 128;
    o.dtype = dt;
    o.seed = seed;
    o.layout = MOE_GEN_LAYOUT_PER_EXPERT;
    if (moe_genmodel_write(&o, &err) < 0)
        FAIL("genmodel %s: %s", moe_arch_name(a), err.msg);
    return dir;
}

static char *pack(const char *src, enum moe_quant q, int group, const char *tag)
{
    struct moe_model *m;
    struct moe_error err = {0};
    struct moe_quant_fmt f = {q, 1, group};
    char *dir = test_tmpdir(tag);

    if (moe_model_open(src, &m, &err) < 0)
        FAIL("%s", err.msg);
    if (moe_pack_write_quant(m, dir, true, &f, NULL, NULL, &err) < 0)
        FAIL("pack %s: %s", moe_quant_name(q), err.msg);
    moe_model_free(m);
    return dir;
}

/* An expert's matrix from the store, dequantized in fp64 (or converted). */
static double *deq(const struct moe_model *m, const struct moe_expert_ref *x, int k)
{
    const struct moe_tensor_ref *t[6];
    struct moe_error err = {0};
    double *out;
    uint8_t *wb, *sb;

    moe_expert_tensors(x, t);
    out = malloc((size_t)t[k]->rows * t[k]->cols * sizeof(double));
    wb = malloc(t[k]->nbytes);
    sb = malloc(x->quant.q ? t[k + 3]->nbytes : 1);
    ASSERT_TRUE(out && wb && sb);
    ASSERT_EQ(moe_model_read(m, t[k], wb, &err), 0);
    ASSERT_TRUE(x->quant.q != MOE_QUANT_NONE);
    ASSERT_EQ(moe_model_read(m, t[k + 3], sb, &err), 0);
    for (int64_t r = 0; r < t[k]->rows; r++)
        moe_quant_dequant_row_f64(&x->quant, wb, sb, t[k]->rows, t[k]->cols, r,
                                  out + r * t[k]->cols);
    free(wb);
    free(sb);
    return out;
}

static void ref_expert(const struct moe_model *m, const struct moe_expert_ref *x, const float *xt,
                       double s, double *out)
{
    int64_t H = x->gate.cols, F = x->gate.rows;
    double *g = deq(m, x, 0), *u = deq(m, x, 1), *d = deq(m, x, 2);
    double *act = malloc((size_t)F * sizeof(double));

    ASSERT_TRUE(act != NULL);
    for (int64_t f = 0; f < F; f++) {
        double a = 0, b = 0;

        for (int64_t k = 0; k < H; k++) {
            a += g[f * H + k] * xt[k];
            b += u[f * H + k] * xt[k];
        }
        act[f] = a / (1 + exp(-a)) * b;
    }
    for (int64_t h = 0; h < H; h++) {
        double v = 0;

        for (int64_t f = 0; f < F; f++)
            v += d[h * F + f] * act[f];
        out[h] += s * v;
    }
    free(g);
    free(u);
    free(d);
    free(act);
}

/* The routed experts (top-2 from the given routing) of layer, on the
 * store dir; checked against the fp64 reference; the output to y. */
static void forward_checked(const char *dir, int layer, const float *x, const int32_t *ids,
                            const float *w, float *y)
{
    struct moe_model *m;
    struct moe_engine *e;
    struct moe_error err = {0};
    double ref[T * 256];
    double rel;
    int H;

    if (moe_model_open(dir, &m, &err) < 0)
        FAIL("%s", err.msg);
    H = m->cfg.hidden;
    ASSERT_EQ(moe_engine_init(m, be, &e), 0);
    if (moe_layer_forward_ex(e,
                             &(struct moe_layer_args){.layer = layer,
                                                      .x = x,
                                                      .n_tokens = T,
                                                      .ids = ids,
                                                      .weights = w,
                                                      .flags = MOE_FWD_SKIP_SHARED,
                                                      .out = y},
                             NULL, &err) < 0)
        FAIL("%s: forward: %s", dir, err.msg);
    memset(ref, 0, sizeof(ref));
    for (int t = 0; t < T; t++)
        for (int k = 0; k < 2; k++)
            ref_expert(m, &m->layers[layer].experts[ids[t * 2 + k]], x + t * H, w[t * 2 + k],
                       ref + t * H);
    if (m->cfg.scale_input)
        FAIL("a family that scales the input is not in this test");
    rel = test_rel_l2_f32(y, ref, (size_t)T * H);
    if (!(rel <= 1e-5))
        FAIL("%s (%s): relative error %.3g against the fp64 reference", dir,
             moe_quant_name(m->expert_quant.q), rel);
    moe_engine_free(e);
    moe_model_free(m);
}

static double rel_err(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;

    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / den);
}

static void verify_ok(const char *store, const char *ck)
{
    struct moe_pack_report rep;
    struct moe_error err = {0};

    if (moe_pack_verify(store, ck, &rep, NULL, NULL, &err) != 0)
        FAIL("verify %s against %s: %s", store, ck, err.msg);
    ASSERT_EQ(rep.mismatches, 0);
}

static void test_family(enum moe_arch a)
{
    char *bf = gen(a, MOE_DTYPE_BF16, 9, "pq-bf16"), *f8 = gen(a, MOE_DTYPE_F8_E4M3, 9, "pq-fp8");
    char *stores[5];
    const char *names[5] = {"fp8", "int8 (bf16)", "int4 (bf16)", "int8 (fp8)", "int4 (fp8)"};
    struct moe_model *m;
    struct moe_engine *e;
    struct moe_error err = {0};
    float x[T * 256], yb[T * 256], y[T * 256], w[T * 2];
    int32_t ids[T * 2];
    uint64_t seed = 11;
    int layer, H = 256;

    stores[0] = strdup(f8);
    stores[1] = pack(bf, MOE_QUANT_INT8, 128, "pq-i8");
    stores[2] = pack(bf, MOE_QUANT_INT4, 32, "pq-i4");
    stores[3] = pack(f8, MOE_QUANT_INT8, 64, "pq-f8i8");
    stores[4] = pack(f8, MOE_QUANT_INT4, 64, "pq-f8i4");
    verify_ok(stores[1], bf);
    verify_ok(stores[2], bf);
    verify_ok(stores[3], f8);
    verify_ok(stores[4], f8);

    /* the bf16 layer, routed by its router */
    if (moe_model_open(bf, &m, &err) < 0)
        FAIL("%s", err.msg);
    layer = m->cfg.n_layers - 1;
    ASSERT_EQ(moe_engine_init(m, be, &e), 0);
    for (int i = 0; i < T * H; i++)
        x[i] = test_rand_f32(&seed) * 2;
    ASSERT_EQ(moe_layer_route(e, layer, x, T, ids, w, &err), 0);
    ASSERT_EQ(moe_layer_forward_ex(e,
                                   &(struct moe_layer_args){.layer = layer,
                                                            .x = x,
                                                            .n_tokens = T,
                                                            .ids = ids,
                                                            .weights = w,
                                                            .flags = MOE_FWD_SKIP_SHARED,
                                                            .out = yb},
                                   NULL, &err),
              0);
    moe_engine_free(e);
    moe_model_free(m);

    printf("%-12s error against the bf16 layer:", moe_arch_name(a));
    for (int s = 0; s < 5; s++) {
        double r;

        forward_checked(stores[s], layer, x, ids, w, y);
        r = rel_err(y, yb, (size_t)T * H);
        printf("  %s %.4f", names[s], r);
        /* what each format keeps, loosely: a bug (a wrong scale, a swapped
         * nibble) gives errors of order 1 */
        ASSERT_TRUE(r < (s == 2 || s == 4 ? 0.3 : 0.1));
        test_rmtree(stores[s]);
        free(stores[s]);
    }
    printf("\n");
    test_rmtree(bf);
    test_rmtree(f8);
    free(bf);
    free(f8);
}

/* ---- transposed experts ------------------------------------------------------------ */

/*
 * Llama 4's and gpt-oss's fused experts are stored transposed (gate_up
 * [E, H, 2F], gpt-oss's with gate and up interleaved; down [E, F, H]); the
 * store holds them plain, quantized along each plain row (the reduction
 * dimension of the rows the kernels read).  Checked independently of the
 * packer's untransposing: each row is gathered from the checkpoint's bytes
 * here, quantized with moe_quant_row and compared with the store's bytes;
 * moe_pack_verify agrees; the store serves the layer within each format's
 * error of the bf16 checkpoint (a wrong axis gives errors of order 1).
 */
static void test_transposed(enum moe_arch a, enum moe_quant q, int group)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *ck_dir = test_tmpdir("pq-t-ck"), *st;
    struct moe_model *ck, *st_m;
    struct moe_engine *e;
    float x[T * 256], yb[T * 256], y[T * 256], w[T * 2];
    int32_t ids[T * 2];
    uint64_t seed = 5;
    int layer = -1, H, F, checked = 0;
    double r;

    moe_genmodel_defaults(a, &o);
    o.out_dir = ck_dir;
    o.n_layers = 2;
    o.n_experts = 4;
    o.top_k = 2;
    o.hidden = 256;
    o.ffn = 128;
    o.dtype = MOE_DTYPE_BF16;
    o.seed = 3;
    if (moe_genmodel_write(&o, &err) < 0)
        FAIL("genmodel %s: %s", moe_arch_name(a), err.msg);
    st = pack(ck_dir, q, group, "pq-t-st");
    verify_ok(st, ck_dir);
    if (moe_model_open(ck_dir, &ck, &err) < 0 || moe_model_open(st, &st_m, &err) < 0)
        FAIL("%s", err.msg);
    H = ck->cfg.hidden;
    F = ck->cfg.expert_ffn;
    for (int i = 0; i < ck->cfg.n_layers; i++) {
        if (!ck->layers[i].is_moe)
            continue;
        layer = i;
        for (int ex = 0; ex < ck->cfg.n_experts; ex++) {
            const struct moe_expert_ref *cx = &ck->layers[i].experts[ex];
            const struct moe_expert_ref *sx = &st_m->layers[i].experts[ex];
            const struct moe_tensor_ref *st_t[6];
            uint16_t *gu = malloc((size_t)(2 * F * H) * 2), *dn = malloc((size_t)(F * H) * 2);

            ASSERT_TRUE(gu && dn);
            ASSERT_TRUE(cx->transposed);
            ASSERT_EQ(cx->interleaved, a == MOE_ARCH_GPT_OSS);
            ASSERT_EQ(sx->quant.q, q);
            ASSERT_EQ(moe_expert_tensors(sx, st_t), 6);
            /* gate's bytes then up's are the [H, 2F] matrix; down [F, H] */
            ASSERT_EQ(moe_model_read(ck, &cx->gate, gu, &err), 0);
            ASSERT_EQ(moe_model_read(ck, &cx->up, (uint8_t *)gu + cx->gate.nbytes, &err), 0);
            ASSERT_EQ(moe_model_read(ck, &cx->down, dn, &err), 0);
            for (int k = 0; k < 3; k++) {
                int64_t rows = k < 2 ? F : H, cols = k < 2 ? H : F;
                uint64_t rb = moe_quant_data_bytes(q, 1, cols);
                uint8_t *got = malloc(st_t[k]->nbytes), *want = malloc(rb);
                float *gs = malloc(st_t[k + 3]->nbytes), *ws = malloc((size_t)(cols / group) * 4);
                float *row = malloc((size_t)cols * 4);

                ASSERT_TRUE(got && want && gs && ws && row);
                ASSERT_EQ(st_t[k]->rows, rows);
                ASSERT_EQ(st_t[k]->cols, cols);
                ASSERT_EQ(moe_model_read(st_m, st_t[k], got, &err), 0);
                ASSERT_EQ(moe_model_read(st_m, st_t[k + 3], gs, &err), 0);
                for (int64_t rr = 0; rr < rows; rr++) {
                    for (int64_t c = 0; c < cols; c++) {
                        size_t src;

                        if (k == 2)
                            src = (size_t)(c * H + rr); /* down: [F, H] stored */
                        else if (a == MOE_ARCH_GPT_OSS)
                            src = (size_t)(c * 2 * F + 2 * rr + k); /* gate even, up odd */
                        else
                            src = (size_t)(c * 2 * F + k * F + rr); /* gate, then up */
                        row[c] = moe_bf16_to_f32(k == 2 ? dn[src] : gu[src]);
                    }
                    moe_quant_row(q, group, row, cols, want, ws);
                    if (memcmp(want, got + rr * rb, rb) != 0 ||
                        memcmp(ws, gs + rr * (cols / group), (size_t)(cols / group) * 4) != 0)
                        FAIL("%s %s/%d: layer %d expert %d part %d row %lld: not the "
                             "quantization of the checkpoint's row",
                             moe_arch_name(a), moe_quant_name(q), group, i, ex, k, (long long)rr);
                    checked++;
                }
                free(got);
                free(want);
                free(gs);
                free(ws);
                free(row);
            }
            free(gu);
            free(dn);
        }
    }
    ASSERT_TRUE(layer >= 0 && checked > 0);
    moe_model_free(st_m);

    /* served: the checkpoint's layer and the store's, routed alike */
    ASSERT_EQ(moe_engine_init(ck, be, &e), 0);
    for (int i = 0; i < T * H; i++)
        x[i] = test_rand_f32(&seed) * 2;
    ASSERT_EQ(moe_layer_route(e, layer, x, T, ids, w, &err), 0);
    ASSERT_EQ(moe_layer_forward_ex(e,
                                   &(struct moe_layer_args){.layer = layer,
                                                            .x = x,
                                                            .n_tokens = T,
                                                            .ids = ids,
                                                            .weights = w,
                                                            .flags = MOE_FWD_SKIP_SHARED,
                                                            .out = yb},
                                   NULL, &err),
              0);
    moe_engine_free(e);
    if (moe_model_open(st, &st_m, &err) < 0)
        FAIL("%s", err.msg);
    ASSERT_EQ(moe_engine_init(st_m, be, &e), 0);
    ASSERT_EQ(moe_layer_forward_ex(e,
                                   &(struct moe_layer_args){.layer = layer,
                                                            .x = x,
                                                            .n_tokens = T,
                                                            .ids = ids,
                                                            .weights = w,
                                                            .flags = MOE_FWD_SKIP_SHARED,
                                                            .out = y},
                                   NULL, &err),
              0);
    moe_engine_free(e);
    r = rel_err(y, yb, (size_t)T * H);
    printf("%-12s transposed, %s/%d: %d rows as the checkpoint's, error against bf16 %.4f\n",
           moe_arch_name(a), moe_quant_name(q), group, checked, r);
    ASSERT_TRUE(r < (q == MOE_QUANT_INT4 ? 0.3 : 0.1));
    moe_model_free(st_m);
    moe_model_free(ck);
    test_rmtree(st);
    test_rmtree(ck_dir);
    free(st);
    free(ck_dir);
}

/* ---- bad input --------------------------------------------------------------------- */

static void edit_index(const char *dir, const char *key, json_t *v)
{
    char *path;
    json_t *root;

    ASSERT_TRUE(asprintf(&path, "%s/%s", dir, MOE_PACK_INDEX) > 0);
    root = json_load_file(path, 0, NULL);
    ASSERT_TRUE(root != NULL);
    json_object_set_new(json_object_get(root, "quantization"), key, v);
    ASSERT_EQ(json_dump_file(root, path, JSON_INDENT(1)), 0);
    json_decref(root);
    free(path);
}

static void test_bad(void)
{
    char *bf = gen(MOE_ARCH_QWEN3_MOE, MOE_DTYPE_BF16, 1, "pq-bad");
    char *other = gen(MOE_ARCH_QWEN3_MOE, MOE_DTYPE_BF16, 2, "pq-other");
    char *st = pack(bf, MOE_QUANT_INT4, 32, "pq-st"), *out = test_tmpdir("pq-out");
    struct moe_model *m, *pm;
    struct moe_error err = {0};
    struct moe_pack_report rep;
    struct moe_quant_fmt f = {MOE_QUANT_INT4, 1, 96};
    char *path;
    FILE *fp;

    ASSERT_EQ(moe_model_open(bf, &m, &err), 0);
    /* 96 does not divide 256 */
    ASSERT_EQ(moe_pack_write_quant(m, out, true, &f, NULL, NULL, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "--group 96 must divide its columns");
    ASSERT_CONTAINS(err.msg, "experts.0.gate_proj.weight' [128, 256]");
    f.bcols = 48;
    ASSERT_EQ(moe_pack_write_quant(m, out, true, &f, NULL, NULL, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "--group 48: expected a multiple of 32");
    f = (struct moe_quant_fmt){MOE_QUANT_FP8, 1, 32};
    ASSERT_EQ(moe_pack_write_quant(m, out, true, &f, NULL, NULL, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "--quantize fp8: expected int8 or int4");
    moe_model_free(m);
    /* no store left behind */
    ASSERT_TRUE(asprintf(&path, "%s/%s", out, MOE_PACK_INDEX) > 0);
    ASSERT_TRUE(access(path, F_OK) != 0);
    free(path);

    /* a quantized store is not quantized again */
    ASSERT_EQ(moe_model_open(st, &pm, &err), 0);
    ASSERT_EQ(pm->expert_quant.q, MOE_QUANT_INT4);
    ASSERT_EQ(pm->expert_quant.bcols, 32);
    ASSERT_EQ(pm->expert_dtype, MOE_DTYPE_U8);
    ASSERT_EQ(pm->expert_bytes, 3 * (128 * 256 / 2) + 3 * (128 * 8 * 4));
    f = (struct moe_quant_fmt){MOE_QUANT_INT8, 1, 32};
    ASSERT_EQ(moe_pack_write_quant(pm, out, true, &f, NULL, NULL, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "its experts are already int4");
    moe_model_free(pm);

    /* against another checkpoint: the first quantized tensor that differs */
    ASSERT_EQ(moe_pack_verify(st, other, &rep, NULL, NULL, &err), -EBADMSG);
    ASSERT_CONTAINS(err.msg, "differs from the int4 quantization (group 32) of the checkpoint's");
    printf("verify against another checkpoint: %s\n", err.msg);

    /* a flipped value byte: the checksums */
    ASSERT_TRUE(asprintf(&path, "%s/%s", st, MOE_PACK_DATA) > 0);
    fp = fopen(path, "r+b");
    ASSERT_TRUE(fp != NULL);
    ASSERT_EQ(fseek(fp, 100, SEEK_SET), 0);
    fputc(0x5a, fp);
    fclose(fp);
    free(path);
    ASSERT_EQ(moe_pack_verify(st, NULL, &rep, NULL, NULL, &err), -EBADMSG);
    ASSERT_CONTAINS(err.msg, "layer 0 expert 0: checksum mismatch");
    ASSERT_CONTAINS(err.msg, "experts.0.gate_proj.weight'");

    /* "quantization" in the index */
    {
        static const struct {
            const char *key;
            const char *json;
            const char *needle;
        } bad[] = {
            {"format", "\"int3\"",
             "quantization: 'format' is \"int3\": expected \"int8\" or "
             "\"int4\""},
            {"format", "7", "'format'"},
            {"group", "40", "quantization: 'group' is 40: expected a multiple of 32"},
            {"group", "16", "'group' is 16"},
            {"group", "8192", "'group'"},
            {"group", "\"32\"", "'group'"},
        };

        for (size_t i = 0; i < MOE_ARRAY_SIZE(bad); i++) {
            char *st2 = pack(bf, MOE_QUANT_INT8, 128, "pq-ix");

            edit_index(st2, bad[i].key, json_loads(bad[i].json, JSON_DECODE_ANY, NULL));
            ASSERT_TRUE(moe_model_open(st2, &pm, &err) == -EINVAL);
            ASSERT_CONTAINS(err.msg, bad[i].needle);
            test_rmtree(st2);
            free(st2);
        }
        /* int8 values read as int4: the shapes do not fit */
        {
            char *st2 = pack(bf, MOE_QUANT_INT8, 128, "pq-ix");

            edit_index(st2, "format", json_string("int4"));
            ASSERT_TRUE(moe_model_open(st2, &pm, &err) == -EINVAL);
            ASSERT_CONTAINS(err.msg, "gate_proj.weight': dtype I8: expected U8 (int4 values)");
            printf("refused: %s\n", err.msg);
            test_rmtree(st2);
            free(st2);
        }
    }
    test_rmtree(bf);
    test_rmtree(other);
    test_rmtree(st);
    test_rmtree(out);
    free(bf);
    free(other);
    free(st);
    free(out);
}

int main(void)
{
    static const enum moe_arch fams[] = {MOE_ARCH_MIXTRAL, MOE_ARCH_QWEN2_MOE, MOE_ARCH_QWEN3_MOE,
                                         MOE_ARCH_OLMOE, MOE_ARCH_DEEPSEEK_V3};
    struct moe_cpu_config cfg = {.n_threads = 2};
    struct moe_error err = {0};

    ASSERT_EQ(moe_backend_cpu_init(&cfg, &be, &err), 0);
    test_bad();
    for (size_t i = 0; i < MOE_ARRAY_SIZE(fams); i++)
        test_family(fams[i]);
    test_transposed(MOE_ARCH_LLAMA4, MOE_QUANT_INT8, 128);
    test_transposed(MOE_ARCH_LLAMA4, MOE_QUANT_INT4, 32);
    test_transposed(MOE_ARCH_GPT_OSS, MOE_QUANT_INT8, 32);
    test_transposed(MOE_ARCH_GPT_OSS, MOE_QUANT_INT4, 32);
    moe_backend_free(be);
    printf("pack-quant: ok\n");
    return 0;
}
