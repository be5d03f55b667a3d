/*
 * gpt-oss's MXFP4 experts as released, end to end: moe_genmodel_write with
 * quant MXFP4 writes the published layout (quantization_config quant_method
 * "mxfp4", gate_up_proj_blocks U8 [E, 2F, H / 32, 16] with gate and up rows
 * interleaved, gate_up_proj_scales [E, 2F, H / 32], down_proj_blocks
 * [E, H, F / 32, 16], down_proj_scales [E, H, F / 32], biases bf16); the
 * blocks hold the bf16 layout's values, quantized, in the orientation
 * transformers' dequantize reads (checked against the bf16 checkpoint); the
 * loader maps each expert to its slices (its size the stored size); a layer
 * forward (experts through the cache and the pager, de-interleaved at
 * page-in) matches an fp64 reference decoded from the file's bytes with
 * transformers' FP4 table (layer_ref.h), 1e-5 relative, with the router
 * checked against its fp64 reference too; an expert paged out and in again
 * gives the same output.  Bad input is refused naming the tensor: wrong
 * shapes (blocks and scales), a wrong dtype, a missing scale tensor, sizes
 * not multiples of 32, no quantization_config, a layer with MXFP4 and bf16
 * experts, layers of different formats, a scale of 255 (NaN in e8m0, at
 * page-in), and bytes of the blocks or the scales changed under a loaded
 * model (the page-in checksum covers both); quant_method mxfp4 on another
 * family.  A bf16 conversion keeping the release's quantization_config
 * loads its plain experts.
 *
 * moectl pack (moe_pack_write) of the MXFP4 checkpoint: the store holds
 * each expert plain, gate's rows then up's (values and e8m0 scales taken
 * apart at pack time, checked here row by row against the checkpoint's
 * interleaved rows), MXFP4 at the checkpoint's stored size, with the
 * biases; it serves each layer bit for bit as the checkpoint does (same
 * bytes, same kernel), within 1e-5 of the fp64 reference; moe_pack_verify
 * passes against the checkpoint, and catches a byte changed in the
 * checkpoint's up rows (the comparison de-interleaves them) and a byte
 * flipped in the store (its checksums), which the page-in refuses too;
 * --quantize int8 of the MXFP4 checkpoint is refused, naming it.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "cache.h"
#include "common.h"
#include "dtype.h"
#include "genmodel.h"
#include "layer.h"
#include "layer_ref.h"
#include "model.h"
#include "pack.h"
#include "quant.h"
#include "safetensors.h"
#include "st_writer.h"
#include "st_rewrite.h"
#include "tests.h"

#define H 160 /* 5 blocks of 32: an odd count */
#define F 96
#define E 8
#define K 2
#define T 9
#define L 3

static struct moe_backend *be;

static char *gen(enum moe_quant q, const char *tag)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *dir = test_tmpdir(tag);

    moe_genmodel_defaults(MOE_ARCH_GPT_OSS, &o);
    o.out_dir = dir;
    o.n_layers = L;
    o.n_experts = E;
    o.top_k = K;
    o.hidden = H;
    o.ffn = F;
    o.quant = q;
    o.seed = 7;
    if (moe_genmodel_write(&o, &err) < 0)
        FAIL("genmodel: %s", err.msg);
    return dir;
}

/* ---- the good checkpoint -------------------------------------------------------------- */

#define EXP(l, p) "model.layers." #l ".mlp.experts." #p

/*
 * The file's layout against the bf16 checkpoint of the same seed: the
 * blocks decoded with transformers' table (layer_ref.h) are the bf16
 * values quantized, row 2f of gate_up_proj_blocks[e] gate_up_proj[e][:, 2f]
 * (gate) and row 2f + 1 column 2f + 1 (up), down_proj_blocks[e] row h
 * down_proj[e][:, h].  Relative L2 error of MXFP4 on uniform values is a
 * few percent; the wrong orientation or pairing would be about 1.4.
 */
static void check_layout(const struct moe_model *m, const struct moe_model *mb)
{
    double num[2] = {0, 0}, den[2] = {0, 0};

    for (int e = 0; e < E; e++) {
        struct dexpert q = {0}, b = {0};

        dexpert_load(m, &m->layers[1].experts[e], &q);
        dexpert_load(mb, &mb->layers[1].experts[e], &b);
        for (int64_t i = 0; i < (int64_t)F * H; i++) {
            num[0] += (q.g[i] - b.g[i]) * (q.g[i] - b.g[i]) + (q.u[i] - b.u[i]) * (q.u[i] - b.u[i]);
            den[0] += b.g[i] * b.g[i] + b.u[i] * b.u[i];
            num[1] += (q.d[i] - b.d[i]) * (q.d[i] - b.d[i]);
            den[1] += b.d[i] * b.d[i];
        }
        dexpert_free(&q);
        dexpert_free(&b);
    }
    printf("layout: MXFP4 vs bf16 values, relative L2: gate/up %.4f, down %.4f\n",
           sqrt(num[0] / den[0]), sqrt(num[1] / den[1]));
    ASSERT_TRUE(sqrt(num[0] / den[0]) < 0.15 && sqrt(num[1] / den[1]) < 0.15);
}

/* The forward of layer against its fp64 references (routing, then the
 * output for that routing); returns the relative error. */
static double check_forward(struct moe_engine *eng, const struct moe_model *m, int layer,
                            const float *x, float *y)
{
    struct moe_error err = {0};
    int32_t ids[T * K], rid[T * K];
    float wts[T * K];
    double rw[T * K], ref[T * H], e;

    if (moe_layer_forward(eng, layer, x, T, NULL, NULL, y, ids, wts, NULL, &err) < 0)
        FAIL("forward: %s", err.msg);
    layer_ref_route_gpt_oss(m, layer, x, T, rid, rw);
    for (int i = 0; i < T * K; i++) {
        if (ids[i] != rid[i])
            FAIL("layer %d: routing slot %d: expert %d, the reference %d", layer, i, ids[i],
                 rid[i]);
        ASSERT_TRUE(fabs(wts[i] - rw[i]) <= 1e-5);
    }
    layer_ref(m, layer, x, T, ids, wts, ref);
    e = test_rel_l2_f32(y, ref, T * H);
    if (!(e <= 1e-5))
        FAIL("layer %d: relative error %.3g against the fp64 reference", layer, e);
    return e;
}

static void test_good(void)
{
    char *dir = gen(MOE_QUANT_MXFP4, "mxfp4"), *bdir = gen(MOE_QUANT_NONE, "mxfp4-bf16");
    struct moe_model *m, *mb;
    struct moe_engine *eng, *engb;
    struct moe_error err = {0};
    float x[T * H], y[T * H], y2[T * H], yb[T * H], wts[T * K];
    int32_t ids[T * K];
    uint64_t seed = 3;
    const uint64_t v = (uint64_t)F * H / 2, s = (uint64_t)F * H / 32;

    if (moe_model_open(dir, &m, &err) < 0)
        FAIL("%s", err.msg);
    ASSERT_EQ(m->cfg.quant.q, MOE_QUANT_MXFP4);
    ASSERT_EQ(m->expert_quant.q, MOE_QUANT_MXFP4);
    ASSERT_EQ(m->expert_quant.brows, 1);
    ASSERT_EQ(m->expert_quant.bcols, 32);
    ASSERT_EQ(m->expert_dtype, MOE_DTYPE_U8);
    ASSERT_EQ(m->cfg.dtype, MOE_DTYPE_BF16);
    {
        const struct moe_expert_ref *x3 = &m->layers[1].experts[3];

        ASSERT_STREQ(x3->gate.name, EXP(1, gate_up_proj_blocks));
        ASSERT_STREQ(x3->up.name, EXP(1, gate_up_proj_blocks));
        ASSERT_STREQ(x3->gate_s.name, EXP(1, gate_up_proj_scales));
        ASSERT_STREQ(x3->down.name, EXP(1, down_proj_blocks));
        ASSERT_STREQ(x3->down_s.name, EXP(1, down_proj_scales));
        ASSERT_TRUE(x3->interleaved && !x3->transposed);
        ASSERT_EQ(x3->gate.rows, F);
        ASSERT_EQ(x3->gate.cols, H);
        ASSERT_EQ(x3->down.rows, H);
        ASSERT_EQ(x3->down.cols, F);
        ASSERT_EQ(x3->gate.nbytes, v);
        ASSERT_EQ(x3->up.offset, x3->gate.offset + v);
        ASSERT_EQ(x3->gate_s.nbytes, s);
        ASSERT_EQ(x3->up_s.offset, x3->gate_s.offset + s);
        ASSERT_EQ(x3->down_s.cols, F / 32);
        /* the stored size: 4.25 bits a weight */
        ASSERT_EQ(x3->nbytes, 3 * v + 3 * s);
        ASSERT_EQ(m->expert_bytes, 3 * v + 3 * s);
        ASSERT_EQ(m->layers[1].router.dtype, MOE_DTYPE_BF16);
        ASSERT_EQ(m->layers[1].gate_up_bias.dtype, MOE_DTYPE_BF16);
        /* expert 3's slices: after experts 0-2 */
        ASSERT_EQ(x3->gate.offset - m->layers[1].experts[0].gate.offset, 3 * 2 * v);
        ASSERT_EQ(x3->down_s.offset - m->layers[1].experts[0].down_s.offset, 3 * s);
    }
    if (moe_model_open(bdir, &mb, &err) < 0)
        FAIL("%s", err.msg);
    check_layout(m, mb);
    ASSERT_EQ(moe_engine_init(m, be, &eng), 0);
    ASSERT_EQ(moe_engine_init(mb, be, &engb), 0);
    for (int i = 0; i < T * H; i++)
        x[i] = test_rand_f32(&seed) * 2;
    for (int layer = 0; layer < L; layer++) {
        double e = check_forward(eng, m, layer, x, y), num = 0, den = 0;

        /* paged out and in again: the same output (the second page-in
         * checks the checksum of the first, and de-interleaves again) */
        ASSERT_EQ(moe_layer_forward(eng, layer, x, T, NULL, NULL, y, ids, wts, NULL, &err), 0);
        for (int i = 0; i < T * K; i++)
            if (moe_cache_resident(moe_engine_cache(eng), moe_engine_model_id(eng), layer, ids[i]))
                ASSERT_EQ(moe_cache_evict(moe_engine_cache(eng), moe_engine_model_id(eng), layer,
                                          ids[i], &err),
                          0);
        ASSERT_EQ(moe_layer_forward(eng, layer, x, T, ids, wts, y2, NULL, NULL, NULL, &err), 0);
        ASSERT_EQ(memcmp(y, y2, sizeof(y)), 0);
        /* the same routing on the bf16 model: the quantization's error */
        ASSERT_EQ(moe_layer_forward(engb, layer, x, T, ids, wts, yb, NULL, NULL, NULL, &err), 0);
        for (int i = 0; i < T * H; i++) {
            num += ((double)y[i] - yb[i]) * ((double)y[i] - yb[i]);
            den += (double)yb[i] * yb[i];
        }
        printf("layer %d: mxfp4 vs fp64 reference %.2g; mxfp4 vs the bf16 layer %.4f "
               "(reported)\n",
               layer, e, sqrt(num / den));
        ASSERT_TRUE(sqrt(num / den) < 0.2);
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

/* ---- moectl pack ------------------------------------------------------------------- */

/* Bytes [off, off + n) of file path. */
static uint8_t *file_bytes(const char *path, uint64_t off, uint64_t n)
{
    uint8_t *b = malloc(n);
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    ASSERT_TRUE(b != NULL && fd >= 0);
    ASSERT_EQ(pread(fd, b, n, (off_t)off), (ssize_t)n);
    close(fd);
    return b;
}

/* Flips byte off of path (mtime kept when when is not NULL). */
static void flip_byte(const char *path, uint64_t off, const struct timespec *when)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    uint8_t b;

    ASSERT_TRUE(fd >= 0);
    ASSERT_EQ(pread(fd, &b, 1, (off_t)off), 1);
    b ^= 0x22; /* an e8m0 scale stays below 255 */
    ASSERT_EQ(pwrite(fd, &b, 1, (off_t)off), 1);
    if (when)
        ASSERT_EQ(futimens(fd, when), 0);
    close(fd);
}

static void test_pack(void)
{
    char *dir = gen(MOE_QUANT_MXFP4, "mxfp4-ck"), *out = test_tmpdir("mxfp4-pack"), *store, *qst;
    const uint64_t v = (uint64_t)F * H / 2, s = (uint64_t)F * H / 32;
    struct moe_model *m, *ms;
    struct moe_engine *eng, *engs;
    struct moe_error err = {0};
    struct moe_pack_report rep;
    struct moe_quant_fmt q8 = {MOE_QUANT_INT8, 1, 32};
    float x[T * H], y[T * H], ys[T * H], wts[T * K];
    int32_t ids[T * K];
    uint64_t seed = 11;

    ASSERT_TRUE(asprintf(&store, "%s/store", out) > 0);
    ASSERT_TRUE(asprintf(&qst, "%s/q8", out) > 0);
    if (moe_model_open(dir, &m, &err) < 0)
        FAIL("%s", err.msg);
    /* --quantize from MXFP4: refused, naming the checkpoint; nothing written */
    ASSERT_EQ(moe_pack_write_quant(m, qst, false, &q8, NULL, NULL, &err), -ENOTSUP);
    ASSERT_CONTAINS(err.msg, dir);
    ASSERT_CONTAINS(err.msg, "its experts are MXFP4 (gpt-oss as released), which --quantize "
                             "int8|int4 does not convert: pack without --quantize");
    ASSERT_TRUE(access(qst, F_OK) != 0);

    if (moe_pack_write(m, store, false, NULL, NULL, &err) < 0)
        FAIL("pack: %s", err.msg);
    if (moe_model_open(store, &ms, &err) < 0)
        FAIL("open the store: %s", err.msg);
    ASSERT_TRUE(ms->packed);
    ASSERT_EQ(ms->expert_quant.q, MOE_QUANT_MXFP4);
    ASSERT_EQ(ms->expert_quant.bcols, 32);
    ASSERT_EQ(ms->expert_dtype, MOE_DTYPE_U8);
    /* the checkpoint's stored size: 4.25 bits a weight */
    ASSERT_EQ(ms->expert_bytes, 3 * v + 3 * s);
    ASSERT_EQ(ms->total_expert_bytes, m->total_expert_bytes);
    for (int layer = 0; layer < L; layer++) {
        ASSERT_TRUE(ms->layers[layer].has_expert_bias && ms->layers[layer].has_router_bias);
        for (int e = 0; e < E; e++) {
            const struct moe_expert_ref *xc = &m->layers[layer].experts[e];
            const struct moe_expert_ref *xs = &ms->layers[layer].experts[e];
            char name[256], sname[300];
            const struct moe_st_tensor *st;
            /* the checkpoint's bytes as stored: [2F] interleaved rows */
            uint8_t *cv = file_bytes(m->files[xc->gate.file].path, xc->gate.offset, 2 * v);
            uint8_t *cs = file_bytes(m->files[xc->gate_s.file].path, xc->gate_s.offset, 2 * s);
            uint8_t *cd = file_bytes(m->files[xc->down.file].path, xc->down.offset, v);
            uint8_t *cds = file_bytes(m->files[xc->down_s.file].path, xc->down_s.offset, s);
            uint8_t *b = file_bytes(ms->files[0].path, xs->gate.offset, xs->nbytes);
            const uint8_t *sv = b, *ss = b + 3 * v;

            ASSERT_TRUE(xs->blob && xs->has_xxh3 && !xs->interleaved && !xs->transposed);
            ASSERT_EQ(xs->nbytes, 3 * v + 3 * s);
            ASSERT_EQ(xs->gate.offset % MOE_PACK_ALIGN, 0);
            /* gate, up, down, then their scales, back to back */
            ASSERT_EQ(xs->up.offset, xs->gate.offset + v);
            ASSERT_EQ(xs->down.offset, xs->gate.offset + 2 * v);
            ASSERT_EQ(xs->gate_s.offset, xs->gate.offset + 3 * v);
            ASSERT_EQ(xs->up_s.offset, xs->gate.offset + 3 * v + s);
            ASSERT_EQ(xs->down_s.offset, xs->gate.offset + 3 * v + 2 * s);
            /* row f of gate is row 2f of the checkpoint's, row f of up
             * row 2f + 1; values (H / 2 bytes a row) and scales (H / 32) */
            for (int64_t f = 0; f < F; f++) {
                ASSERT_EQ(memcmp(sv + f * (H / 2), cv + 2 * f * (H / 2), H / 2), 0);
                ASSERT_EQ(memcmp(sv + v + f * (H / 2), cv + (2 * f + 1) * (H / 2), H / 2), 0);
                ASSERT_EQ(memcmp(ss + f * (H / 32), cs + 2 * f * (H / 32), H / 32), 0);
                ASSERT_EQ(memcmp(ss + s + f * (H / 32), cs + (2 * f + 1) * (H / 32), H / 32), 0);
            }
            ASSERT_EQ(memcmp(sv + 2 * v, cd, v), 0);
            ASSERT_EQ(memcmp(ss + 2 * s, cds, s), 0);
            /* the index: per-expert names, U8 [F, H / 2] and [F, H / 32] */
            snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.up_proj.weight", layer, e);
            snprintf(sname, sizeof(sname), "%s_scale", name);
            st = moe_st_header_find(ms->headers[0], name);
            ASSERT_TRUE(st && st->dtype == MOE_DTYPE_U8 && st->ndim == 2 && st->shape[0] == F &&
                        st->shape[1] == H / 2);
            st = moe_st_header_find(ms->headers[0], sname);
            ASSERT_TRUE(st && st->dtype == MOE_DTYPE_U8 && st->ndim == 2 && st->shape[0] == F &&
                        st->shape[1] == H / 32);
            snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.down_proj.weight_scale",
                     layer, e);
            st = moe_st_header_find(ms->headers[0], name);
            ASSERT_TRUE(st && st->shape[0] == H && st->shape[1] == F / 32);
            free(cv);
            free(cs);
            free(cd);
            free(cds);
            free(b);
        }
    }

    /* served: bit for bit the checkpoint's output, each layer */
    ASSERT_EQ(moe_engine_init(m, be, &eng), 0);
    ASSERT_EQ(moe_engine_init(ms, be, &engs), 0);
    for (int i = 0; i < T * H; i++)
        x[i] = test_rand_f32(&seed) * 2;
    for (int layer = 0; layer < L; layer++) {
        int32_t sids[T * K];
        float swts[T * K];
        double e = check_forward(engs, ms, layer, x, ys);

        ASSERT_EQ(moe_layer_forward(eng, layer, x, T, NULL, NULL, y, ids, wts, NULL, &err), 0);
        ASSERT_EQ(moe_layer_forward(engs, layer, x, T, NULL, NULL, ys, sids, swts, NULL, &err), 0);
        ASSERT_EQ(memcmp(ids, sids, sizeof(ids)), 0);
        ASSERT_EQ(memcmp(wts, swts, sizeof(wts)), 0);
        ASSERT_EQ(memcmp(y, ys, sizeof(y)), 0);
        printf("pack: layer %d: the store's output is the checkpoint's, bit for bit; %.2g from "
               "the fp64 reference\n",
               layer, e);
    }
    moe_engine_free(engs);

    /* verify: passes against the checkpoint, every tensor compared */
    memset(&rep, 0, sizeof(rep));
    if (moe_pack_verify(store, dir, &rep, NULL, NULL, &err) != 0)
        FAIL("verify: %s", err.msg);
    ASSERT_EQ(rep.mismatches, 0);
    ASSERT_EQ(rep.experts_checked, (uint64_t)L * E);
    /* 6 per expert, router, its bias and the two expert biases per layer */
    ASSERT_EQ(rep.tensors_checked, (uint64_t)L * (E * 6 + 4));

    {
        /* a byte of layer 1 expert 3's up (row 2 x 5 + 1 of its
         * gate_up_proj_blocks) changed in a copy of the checkpoint: verify
         * --model finds it in up */
        const struct moe_expert_ref *xc = &m->layers[1].experts[3];
        char *ck2 = test_tmpdir("mxfp4-ck2"), *cmd;

        ASSERT_TRUE(asprintf(&cmd, "cp %s/* %s/", dir, ck2) > 0);
        ASSERT_EQ(system(cmd), 0);
        free(cmd);
        ASSERT_TRUE(asprintf(&cmd, "%s/%s", ck2, m->files[xc->gate.file].name) > 0);
        flip_byte(cmd, xc->gate.offset + 11 * (H / 2) + 7, NULL);
        free(cmd);
        memset(&rep, 0, sizeof(rep));
        ASSERT_EQ(moe_pack_verify(store, ck2, &rep, NULL, NULL, &err), -EBADMSG);
        ASSERT_EQ(rep.mismatches, 1);
        ASSERT_CONTAINS(err.msg, "layer 1 expert 3: tensor "
                                 "'model.layers.1.mlp.experts.3.up_proj.weight': differs from "
                                 "the checkpoint's");
        /* row 5 of up, byte 7: 5 x 80 + 7 */
        ASSERT_CONTAINS(err.msg, "at byte 407 ");
        printf("verify, a changed checkpoint: %s\n", err.msg);
        /* and its scales: row 2 x 4 (gate 4), scale 2 */
        ASSERT_TRUE(asprintf(&cmd, "cp %s/* %s/", dir, ck2) > 0);
        ASSERT_EQ(system(cmd), 0);
        free(cmd);
        ASSERT_TRUE(asprintf(&cmd, "%s/%s", ck2, m->files[xc->gate_s.file].name) > 0);
        flip_byte(cmd, xc->gate_s.offset + 8 * (H / 32) + 2, NULL);
        free(cmd);
        ASSERT_EQ(moe_pack_verify(store, ck2, &rep, NULL, NULL, &err), -EBADMSG);
        ASSERT_EQ(rep.mismatches, 1);
        ASSERT_CONTAINS(err.msg, "tensor 'model.layers.1.mlp.experts.3.gate_proj.weight_scale': "
                                 "differs from the checkpoint's");
        ASSERT_CONTAINS(err.msg, "at byte 22"); /* row 4 of gate's scales, scale 2 */
        test_rmtree(ck2);
        free(ck2);
    }
    {
        /* a store byte flipped (layer 2 expert 6's down scales): verify
         * names the expert, and its page-in is refused */
        const struct moe_expert_ref *xs = &ms->layers[2].experts[6];
        struct timespec when[2] = {{.tv_sec = 1577836800}, {.tv_sec = 1577836800}};
        int32_t six[T * K];
        float w[T * K];

        for (int i = 0; i < T * K; i++) {
            six[i] = i % K ? 1 : 6;
            w[i] = 0.5f;
        }
        ASSERT_EQ(utimensat(AT_FDCWD, ms->files[0].path, when, 0), 0);
        flip_byte(ms->files[0].path, xs->down_s.offset + 3, when);
        memset(&rep, 0, sizeof(rep));
        ASSERT_EQ(moe_pack_verify(store, NULL, &rep, NULL, NULL, &err), -EBADMSG);
        ASSERT_EQ(rep.mismatches, 1);
        ASSERT_CONTAINS(err.msg, "layer 2 expert 6: checksum mismatch");
        ASSERT_CONTAINS(err.msg, "down_proj.weight_scale");
        printf("verify, a flipped store byte: %s\n", err.msg);
        ASSERT_EQ(moe_pack_verify(store, dir, &rep, NULL, NULL, &err), -EBADMSG);
        ASSERT_CONTAINS(err.msg, "layer 2 expert 6: checksum mismatch");
        ASSERT_EQ(moe_engine_init(ms, be, &engs), 0);
        ASSERT_EQ(moe_layer_forward(engs, 2, x, T, six, w, ys, NULL, NULL, NULL, &err), -EBADMSG);
        ASSERT_CONTAINS(err.msg, "checksum mismatch in experts.bin");
        printf("page-in, a flipped store byte: %s\n", err.msg);
        moe_engine_free(engs);
    }
    moe_engine_free(eng);
    moe_model_free(ms);
    moe_model_free(m);
    test_rmtree(out);
    test_rmtree(dir);
    free(store);
    free(qst);
    free(out);
    free(dir);
}

/* ---- bad input --------------------------------------------------------------------- */

static struct rfile bf16_file; /* the bf16 checkpoint's tensors */

static void bad_file(const char *what, void (*mutate)(struct rfile *f), const char *needle)
{
    char *dir = gen(MOE_QUANT_MXFP4, "mxfp4-bad");
    struct rfile f;

    rfile_read(dir, &f);
    mutate(&f);
    rfile_write(dir, &f);
    rfile_free(&f);
    expect_open_fails(dir, what, needle);
    test_rmtree(dir);
    free(dir);
}

/* the same bytes, another shape */
static void blocks_shape(struct rfile *f)
{
    struct rt *t = rfind(f, EXP(2, gate_up_proj_blocks));

    t->shape[2] = H / 16;
    t->shape[3] = 8;
}

/* transposed, as the bf16 down_proj is */
static void blocks_transposed(struct rfile *f)
{
    struct rt *t = rfind(f, EXP(1, down_proj_blocks));

    t->shape[1] = F;
    t->shape[2] = H / 32;
}

static void scales_shape(struct rfile *f)
{
    struct rt *t = rfind(f, EXP(1, down_proj_scales));

    t->shape[1] = F / 32;
    t->shape[2] = H;
}

static void scales_4d(struct rfile *f)
{
    struct rt *t = rfind(f, EXP(2, gate_up_proj_scales));

    t->ndim = 4;
    t->shape[2] = H / 32;
    t->shape[3] = 1;
}

static void scales_missing(struct rfile *f)
{
    rfind(f, EXP(1, down_proj_scales))->dropped = true;
}

static void scales_bf16(struct rfile *f)
{
    struct rt *t = rfind(f, EXP(0, gate_up_proj_scales));
    uint8_t *d = calloc(t->nbytes * 2, 1);

    ASSERT_TRUE(d != NULL);
    free(t->data);
    t->data = d;
    t->nbytes *= 2;
    t->dtype = MOE_DTYPE_BF16;
}

/* layer 1 with the bf16 gate_up_proj beside its blocks */
static void both_formats(struct rfile *f)
{
    struct rt *t = rfind(&bf16_file, EXP(1, gate_up_proj));

    ASSERT_TRUE(t->dtype == MOE_DTYPE_BF16);
    radd(f, t);
}

/* layer 2's experts bf16, layers 0 and 1 MXFP4 */
static void layers_mixed(struct rfile *f)
{
    rfind(f, EXP(2, gate_up_proj_blocks))->dropped = true;
    rfind(f, EXP(2, gate_up_proj_scales))->dropped = true;
    rfind(f, EXP(2, down_proj_blocks))->dropped = true;
    rfind(f, EXP(2, down_proj_scales))->dropped = true;
    radd(f, rfind(&bf16_file, EXP(2, gate_up_proj)));
    radd(f, rfind(&bf16_file, EXP(2, down_proj)));
}

static void bad_config(const char *what, const char *key, json_t *v, const char *needle)
{
    char *dir = gen(MOE_QUANT_MXFP4, "mxfp4-cfg");

    set_cfg(dir, key, v);
    expect_open_fails(dir, what, needle);
    test_rmtree(dir);
    free(dir);
}

/* A scale of expert 4 of layer 1 set to 255 (NaN): found at its first
 * page-in, naming the tensor; the other experts still serve. */
static void bad_scale(const char *tensor, uint64_t at, const char *needle)
{
    char *dir = gen(MOE_QUANT_MXFP4, "mxfp4-nan");
    struct rfile f;
    struct moe_model *m;
    struct moe_engine *eng;
    struct moe_error err = {0};
    float x[H], y[H];
    int32_t ids[2] = {3, 4};
    float w[2] = {0.5f, 0.5f};
    int r;

    rfile_read(dir, &f);
    rfind(&f, tensor)->data[at] = 255;
    rfile_write(dir, &f);
    rfile_free(&f);
    if (moe_model_open(dir, &m, &err) < 0)
        FAIL("%s", err.msg);
    ASSERT_EQ(moe_engine_init(m, be, &eng), 0);
    for (int i = 0; i < H; i++)
        x[i] = 1.0f;
    r = moe_layer_forward(eng, 1, x, 1, ids, w, y, NULL, NULL, NULL, &err);
    if (r != -EINVAL)
        FAIL("scale 255: expected -EINVAL, got %d (%s)", r, err.msg);
    ASSERT_CONTAINS(err.msg, needle);
    ASSERT_CONTAINS(err.msg, "is 255 (NaN in e8m0)");
    ASSERT_CONTAINS(err.msg, "expert 4");
    printf("refused (scale 255): %s\n", err.msg);
    ids[1] = 5;
    ASSERT_EQ(moe_layer_forward(eng, 1, x, 1, ids, w, y, NULL, NULL, NULL, &err), 0);
    moe_engine_free(eng);
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
}

/* 16 bytes of t (at off from its start) flipped under the loaded model,
 * the file's mtime kept: the expert's next page-in fails its checksum. */
static void modified(int expert, int part, uint64_t off)
{
    char *dir = gen(MOE_QUANT_MXFP4, "mxfp4-mod");
    struct moe_model *m;
    struct moe_engine *eng;
    struct moe_error err = {0};
    float x[2 * H], y[2 * H], w[4] = {0.5f, 0.5f, 0.5f, 0.5f};
    int32_t ids[4] = {expert, (expert + 1) % E, (expert + 2) % E, (expert + 3) % E};
    struct timespec when[2] = {{.tv_sec = 1577836800}, {.tv_sec = 1577836800}};
    const struct moe_tensor_ref *t[6];
    uint8_t b[16];
    uint64_t seed = 5;
    int fd;

    if (moe_model_open(dir, &m, &err) < 0)
        FAIL("%s", err.msg);
    moe_expert_tensors(&m->layers[1].experts[expert], t);
    ASSERT_EQ(utimensat(AT_FDCWD, m->files[t[part]->file].path, when, 0), 0);
    ASSERT_EQ(moe_engine_init(m, be, &eng), 0);
    for (int i = 0; i < 2 * H; i++)
        x[i] = test_rand_f32(&seed);
    ASSERT_EQ(moe_layer_forward(eng, 1, x, 2, ids, w, y, NULL, NULL, NULL, &err), 0);
    ASSERT_EQ(moe_cache_evict(moe_engine_cache(eng), moe_engine_model_id(eng), 1, expert, &err), 0);
    fd = open(m->files[t[part]->file].path, O_RDWR | O_CLOEXEC);
    ASSERT_TRUE(fd >= 0);
    ASSERT_EQ(pread(fd, b, sizeof(b), (off_t)(t[part]->offset + off)), (ssize_t)sizeof(b));
    for (size_t i = 0; i < sizeof(b); i++)
        b[i] ^= 0x11; /* scales stay below 255 */
    ASSERT_EQ(pwrite(fd, b, sizeof(b), (off_t)(t[part]->offset + off)), (ssize_t)sizeof(b));
    ASSERT_EQ(futimens(fd, when), 0);
    close(fd);
    ASSERT_EQ(moe_layer_forward(eng, 1, x, 2, ids, w, y, NULL, NULL, NULL, &err), -EBADMSG);
    ASSERT_CONTAINS(err.msg, "checksum mismatch in model.safetensors");
    ASSERT_CONTAINS(err.msg, "changed since it was loaded");
    printf("refused (%s changed): %s\n", t[part]->name, err.msg);
    moe_engine_free(eng);
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
}

static void test_bad(void)
{
    char *bdir = gen(MOE_QUANT_NONE, "mxfp4-bf16src");

    rfile_read(bdir, &bf16_file);
    bad_file("blocks shape", blocks_shape,
             "tensor '" EXP(2, gate_up_proj_blocks) "': shape [8, 192, 10, 8] contradicts "
                                                    "config.json: expected [num_local_experts, 2 x "
                                                    "intermediate_size, hidden_size / 32, 16] = "
                                                    "[8, 192, 5, 16]");
    bad_file("blocks transposed", blocks_transposed,
             "tensor '" EXP(1, down_proj_blocks) "': shape [8, 96, 5, 16] contradicts config.json: "
                                                 "expected [num_local_experts, hidden_size, "
                                                 "intermediate_size / 32, 16] = [8, 160, 3, 16]");
    bad_file("scales shape", scales_shape,
             "tensor '" EXP(1, down_proj_scales) "': shape [8, 3, 160] contradicts config.json: "
                                                 "expected [num_local_experts, hidden_size, "
                                                 "intermediate_size / 32] = [8, 160, 3]");
    bad_file("scales 4-D", scales_4d,
             "tensor '" EXP(2, gate_up_proj_scales) "': shape [8, 192, 5, 1] contradicts");
    bad_file("scales missing", scales_missing,
             "layer 1: MXFP4 experts incomplete: no tensor '" EXP(
                 1, down_proj_scales) "' beside '" EXP(1, gate_up_proj_blocks) "'");
    bad_file("scales dtype", scales_bf16,
             "tensor '" EXP(0, gate_up_proj_scales) "': dtype BF16: expected U8 (e8m0 scales)");
    bad_file("both formats in a layer", both_formats,
             "tensor '" EXP(1, gate_up_proj) "' beside '" EXP(
                 1, gate_up_proj_blocks) "': layer 1 mixes MXFP4 and plain experts");
    bad_file("layers of two formats", layers_mixed,
             "tensor '" EXP(2, gate_up_proj) "': dtype BF16, but the model's other experts are "
                                             "U8: expected one dtype (one format)");
    bad_config("no quantization_config", "quantization_config", NULL,
               "tensor '" EXP(0, gate_up_proj_blocks) "': MXFP4 experts but config.json has no "
                                                      "quantization_config with quant_method "
                                                      "\"mxfp4\"");
    bad_config("ffn not a multiple of 32", "intermediate_size", json_integer(80),
               "tensor '" EXP(0, gate_up_proj_blocks) "': MXFP4 experts need hidden_size (160) "
                                                      "and intermediate_size (80) multiples of 32");
    /* gate_up_proj_scales of expert 4: rows 2f gate, 2f + 1 up; the 7th
     * scale of its slice (row 1, up 0: block 2) */
    bad_scale(EXP(1, gate_up_proj_scales), 4 * 2 * F * (H / 32) + 7,
              EXP(1, gate_up_proj_scales) "': scale 7 is 255");
    bad_scale(EXP(1, down_proj_scales), 4 * H * (F / 32) + 100,
              EXP(1, down_proj_scales) "': scale 100 is 255");
    /* the checksum covers the blocks and the scales, gate/up and down */
    modified(3, 1, 40);  /* up's blocks */
    modified(5, 3, 20);  /* gate's scales */
    modified(6, 4, 200); /* up's scales */
    modified(2, 5, 0);   /* down's scales */
    rfile_free(&bf16_file);
    test_rmtree(bdir);
    free(bdir);
}

/* Refusals of moe_genmodel_write for MXFP4 it cannot write. */
static void test_gen_bad(void)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *dir = test_tmpdir("mxfp4-gen");

    moe_genmodel_defaults(MOE_ARCH_MIXTRAL, &o);
    o.out_dir = dir;
    o.quant = MOE_QUANT_MXFP4;
    ASSERT_EQ(moe_genmodel_write(&o, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "mxfp4: only gpt_oss is released with MXFP4 experts");
    moe_genmodel_defaults(MOE_ARCH_GPT_OSS, &o);
    o.out_dir = dir;
    o.quant = MOE_QUANT_MXFP4;
    o.ffn = 80;
    ASSERT_EQ(moe_genmodel_write(&o, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "expert ffn 80 must be multiples of 32");
    /* quant_method mxfp4 where no release has it: refused */
    moe_genmodel_defaults(MOE_ARCH_MIXTRAL, &o);
    o.out_dir = dir;
    ASSERT_EQ(moe_genmodel_write(&o, &err), 0);
    set_cfg(dir, "quantization_config", json_pack("{s:s}", "quant_method", "mxfp4"));
    expect_open_fails(dir, "mxfp4 on mixtral",
                      "'quantization_config': quant_method is \"mxfp4\": unsupported; moed "
                      "serves \"fp8\" checkpoints (e4m3 with block scales) and gpt_oss "
                      "\"mxfp4\" ones as published");
    test_rmtree(dir);
    free(dir);
}

/* A bf16 conversion of gpt-oss that keeps the release's
 * quantization_config: its experts load plain, and compute as without it. */
static void test_bf16_conversion(void)
{
    char *dir = gen(MOE_QUANT_NONE, "mxfp4-conv");
    struct moe_model *m, *m2;
    struct moe_engine *eng, *eng2;
    struct moe_error err = {0};
    float x[T * H], y[T * H], y2[T * H];
    uint64_t seed = 9;

    if (moe_model_open(dir, &m, &err) < 0)
        FAIL("%s", err.msg);
    set_cfg(dir, "quantization_config", json_pack("{s:s}", "quant_method", "mxfp4"));
    if (moe_model_open(dir, &m2, &err) < 0)
        FAIL("%s", err.msg);
    ASSERT_EQ(m2->cfg.quant.q, MOE_QUANT_MXFP4);
    ASSERT_EQ(m2->expert_quant.q, MOE_QUANT_NONE);
    ASSERT_EQ(m2->expert_dtype, MOE_DTYPE_BF16);
    ASSERT_TRUE(m2->layers[0].experts[0].transposed && m2->layers[0].experts[0].interleaved);
    ASSERT_EQ(m2->expert_bytes, m->expert_bytes);
    ASSERT_EQ(moe_engine_init(m, be, &eng), 0);
    ASSERT_EQ(moe_engine_init(m2, be, &eng2), 0);
    for (int i = 0; i < T * H; i++)
        x[i] = test_rand_f32(&seed);
    ASSERT_EQ(moe_layer_forward(eng, 1, x, T, NULL, NULL, y, NULL, NULL, NULL, &err), 0);
    ASSERT_EQ(moe_layer_forward(eng2, 1, x, T, NULL, NULL, y2, NULL, NULL, NULL, &err), 0);
    ASSERT_EQ(memcmp(y, y2, sizeof(y)), 0);
    moe_engine_free(eng);
    moe_engine_free(eng2);
    moe_model_free(m);
    moe_model_free(m2);
    test_rmtree(dir);
    free(dir);
}

/* moe_quant_mxfp4_row against its definition, value by value. */
static void test_quantize_row(void)
{
    float src[64];
    uint8_t v[32], s[2];
    uint64_t seed = 11;

    for (int i = 0; i < 64; i++)
        src[i] = test_rand_f32(&seed) * 3.0f;
    src[5] = 0.0f;
    for (int i = 32; i < 64; i++)
        src[i] = 0.0f;
    src[40] = -12.0f; /* block 2's max: scale 2^1, -6 exactly */
    src[41] = 5.0f;   /* 2.5: a tie between 2 (code 4) and 3 (code 5): even */
    src[42] = 3.5f;   /* 1.75: a tie between 1.5 (3) and 2 (4): 2 */
    moe_quant_mxfp4_row(src, 64, v, s);
    ASSERT_EQ(s[1], 128);
    ASSERT_EQ(v[20] & 15, 15); /* element 40, low nibble: -6 */
    ASSERT_EQ(v[20] >> 4, 4);  /* element 41, high nibble */
    ASSERT_EQ(v[21] & 15, 4);  /* element 42 */
    ASSERT_EQ(v[16], 0);       /* elements 32, 33: zero */
    {
        float amax = 0;

        for (int i = 0; i < 32; i++)
            amax = fmaxf(amax, fabsf(src[i]));
        /* the least power of two with amax / 2^s <= 6 */
        ASSERT_TRUE(amax / ldexpf(1, s[0] - 127) <= 6.0f);
        ASSERT_TRUE(amax / ldexpf(1, s[0] - 128) > 6.0f);
        for (int i = 0; i < 32; i++) {
            float q = moe_e2m1_to_f32((v[i / 2] >> (4 * (i % 2))) & 15) * ldexpf(1, s[0] - 127);
            float best = INFINITY;

            /* nearest: no e2m1 value is nearer than the one chosen */
            for (unsigned c = 0; c < 16; c++)
                best = fminf(best, fabsf(moe_e2m1_to_f32(c) * ldexpf(1, s[0] - 127) - src[i]));
            ASSERT_TRUE(fabsf(q - src[i]) <= best);
        }
    }
}

int main(void)
{
    struct moe_cpu_config cfg = {.n_threads = 2};
    struct moe_error err = {0};

    ASSERT_EQ(moe_backend_cpu_init(&cfg, &be, &err), 0);
    test_quantize_row();
    test_gen_bad();
    test_good();
    test_pack();
    test_bf16_conversion();
    test_bad();
    moe_backend_free(be);
    printf("mxfp4: ok\n");
    return 0;
}
