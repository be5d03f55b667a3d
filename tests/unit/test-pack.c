/*
 * Tests of the packed store (engine/pack.c and its opening in model.c).
 *
 * Round trip: a tiny synthetic checkpoint of each family (engine/genmodel.h;
 * single file and sharded, bf16 and f32) is packed, the store opened with
 * moe_model_open, and every tensor it serves compared byte for byte with the
 * checkpoint's; blob and checksum fields, alignment and sizes are checked,
 * and the store verifies, alone and against the checkpoint.  Damage: a
 * flipped byte in an expert, in a router, a store compared with another
 * checkpoint, a truncated experts.bin, edited indexes that parse but do not
 * fit config.json.  Refusals: an existing store, the checkpoint's own
 * directory, a directory holding a checkpoint, failures half way (no index
 * left behind).  Parser: a table of bad indexes, each with its message.
 */
#include "genmodel.h"
#include "model.h"
#include "pack.h"
#include "safetensors.h"
#include "tests.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

static char *path_in(const char *dir, const char *name)
{
    char *p;

    if (asprintf(&p, "%s/%s", dir, name) < 0)
        FAIL("asprintf");
    return p;
}

static bool exists(const char *dir, const char *name)
{
    char *p = path_in(dir, name);
    struct stat st;
    bool yes = stat(p, &st) == 0;

    free(p);
    return yes;
}

static uint8_t *slurp(const char *path, size_t *ret_len)
{
    char *buf;
    struct moe_error err;

    if (moe_read_file(path, 64u << 20, &buf, ret_len, &err) < 0)
        FAIL("%s", err.msg);
    return (uint8_t *)buf;
}

/* A tiny checkpoint of arch in dir/ck. */
static char *gen(const char *dir, enum moe_arch arch, enum moe_dtype dt, int shards, uint64_t seed)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *ck = path_in(dir, seed ? "ck2" : "ck");

    moe_genmodel_defaults(arch, &o);
    o.out_dir = ck;
    o.n_layers = 3;
    o.n_experts = 4;
    o.top_k = 2;
    o.hidden = 40; /* expert tensors of 1920 bytes (bf16): blobs not page multiples */
    o.ffn = 24;
    o.dtype = dt;
    o.n_shards = shards;
    o.seed = seed;
    if (moe_genmodel_write(&o, &err) < 0)
        FAIL("gen-model %s: %s", moe_arch_name(arch), err.msg);
    return ck;
}

static void same_bytes(const struct moe_model *a, const struct moe_tensor_ref *ta,
                       const struct moe_model *b, const struct moe_tensor_ref *tb)
{
    struct moe_error err = {0};
    uint8_t *x, *y;

    ASSERT_STREQ(ta->name, tb->name);
    ASSERT_EQ(ta->dtype, tb->dtype);
    ASSERT_EQ(ta->rows, tb->rows);
    ASSERT_EQ(ta->cols, tb->cols);
    ASSERT_EQ(ta->nbytes, tb->nbytes);
    x = malloc(ta->nbytes + 1);
    y = malloc(tb->nbytes + 1);
    if (moe_model_read(a, ta, x, &err) < 0 || moe_model_read(b, tb, y, &err) < 0)
        FAIL("%s", err.msg);
    if (memcmp(x, y, ta->nbytes) != 0)
        FAIL("tensor %s: bytes differ between checkpoint and store", ta->name);
    free(x);
    free(y);
}

/* A tensor of the store outside any blob starts aligned. */
static void same_aligned(const struct moe_model *ck, const struct moe_tensor_ref *t,
                         const struct moe_model *pm, const struct moe_tensor_ref *p)
{
    same_bytes(ck, t, pm, p);
    ASSERT_EQ(p->offset % MOE_PACK_ALIGN, 0);
    ASSERT_EQ(p->file, 0);
}

/* Everything pm serves is what ck serves. */
/* A transposed checkpoint expert x (Llama 4's, gpt-oss's), made plain,
 * against the store's plain expert y. */
static void same_plain(const struct moe_model *ck, const struct moe_expert_ref *x,
                       const struct moe_model *pm, const struct moe_expert_ref *y)
{
    uint8_t *a = malloc(x->nbytes), *b = malloc(y->nbytes);

    ASSERT_TRUE(a && b && x->transposed && !y->transposed && !y->interleaved);
    ASSERT_EQ(x->nbytes, y->nbytes);
    ASSERT_EQ(moe_model_read(ck, &x->gate, a, NULL), 0);
    ASSERT_EQ(moe_model_read(ck, &x->up, a + x->gate.nbytes, NULL), 0);
    ASSERT_EQ(moe_model_read(ck, &x->down, a + x->gate.nbytes + x->up.nbytes, NULL), 0);
    ASSERT_EQ(moe_expert_untranspose(x, a, a + x->gate.nbytes, a + x->gate.nbytes + x->up.nbytes),
              0);
    ASSERT_EQ(moe_model_read(pm, &y->gate, b, NULL), 0);
    ASSERT_EQ(moe_model_read(pm, &y->up, b + y->gate.nbytes, NULL), 0);
    ASSERT_EQ(moe_model_read(pm, &y->down, b + y->gate.nbytes + y->up.nbytes, NULL), 0);
    ASSERT_TRUE(memcmp(a, b, x->nbytes) == 0);
    free(a);
    free(b);
}

static void compare_models(const struct moe_model *ck, const struct moe_model *pm)
{
    struct moe_error err = {0};
    uint8_t *blob;

    ASSERT_TRUE(!ck->packed);
    ASSERT_TRUE(pm->packed);
    ASSERT_EQ(pm->n_files, 1);
    ASSERT_STREQ(pm->files[0].name, MOE_PACK_DATA);
    ASSERT_EQ(pm->files[0].size % MOE_PACK_ALIGN, 0);
    ASSERT_EQ(pm->cfg.arch, ck->cfg.arch);
    ASSERT_EQ(pm->cfg.n_layers, ck->cfg.n_layers);
    ASSERT_EQ(pm->n_moe_layers, ck->n_moe_layers);
    ASSERT_EQ(pm->expert_dtype, ck->expert_dtype);
    ASSERT_EQ(pm->expert_bytes, ck->expert_bytes);
    ASSERT_EQ(pm->total_expert_bytes, ck->total_expert_bytes);
    for (int i = 0; i < ck->cfg.n_layers; i++) {
        const struct moe_layer *a = &ck->layers[i], *b = &pm->layers[i];

        ASSERT_EQ(a->is_moe, b->is_moe);
        if (!a->is_moe)
            continue;
        same_aligned(ck, &a->router, pm, &b->router);
        ASSERT_EQ(a->has_bias, b->has_bias);
        if (a->has_bias)
            same_aligned(ck, &a->bias, pm, &b->bias);
        ASSERT_EQ(a->has_shared, b->has_shared);
        if (a->has_shared) {
            same_aligned(ck, &a->shared.gate, pm, &b->shared.gate);
            same_aligned(ck, &a->shared.up, pm, &b->shared.up);
            same_aligned(ck, &a->shared.down, pm, &b->shared.down);
            ASSERT_TRUE(!b->shared.blob);
        }
        ASSERT_EQ(a->has_shared_gate, b->has_shared_gate);
        if (a->has_shared_gate)
            same_aligned(ck, &a->shared_gate, pm, &b->shared_gate);
        ASSERT_EQ(a->has_router_bias, b->has_router_bias);
        if (a->has_router_bias)
            same_aligned(ck, &a->router_bias, pm, &b->router_bias);
        ASSERT_EQ(a->has_expert_bias, b->has_expert_bias);
        if (a->has_expert_bias) {
            same_aligned(ck, &a->gate_up_bias, pm, &b->gate_up_bias);
            same_aligned(ck, &a->down_bias, pm, &b->down_bias);
        }
        for (int e = 0; e < ck->cfg.n_experts; e++) {
            const struct moe_expert_ref *x = &a->experts[e], *y = &b->experts[e];

            ASSERT_TRUE(!x->blob && !x->has_xxh3);
            ASSERT_TRUE(y->blob && y->has_xxh3);
            if (x->transposed) {
                same_plain(ck, x, pm, y);
            } else {
                same_bytes(ck, &x->gate, pm, &y->gate);
                same_bytes(ck, &x->up, pm, &y->up);
                same_bytes(ck, &x->down, pm, &y->down);
            }
            ASSERT_EQ(y->nbytes, x->nbytes);
            ASSERT_EQ(y->gate.offset % MOE_PACK_ALIGN, 0);
            ASSERT_EQ(y->up.offset, y->gate.offset + y->gate.nbytes);
            ASSERT_EQ(y->down.offset, y->up.offset + y->up.nbytes);
            ASSERT_TRUE(y->gate.offset + y->nbytes <= pm->files[0].size);
            blob = malloc(y->nbytes);
            ASSERT_EQ(moe_pread_full(pm->files[0].fd, blob, y->nbytes, y->gate.offset),
                      (int64_t)y->nbytes);
            ASSERT_EQ(XXH3_64bits(blob, y->nbytes), y->xxh3);
            free(blob);
        }
    }
    (void)err;
}

static void pack_ok(const struct moe_model *m, const char *out, bool overwrite)
{
    struct moe_error err = {0};

    if (moe_pack_write(m, out, overwrite, NULL, NULL, &err) < 0)
        FAIL("pack %s into %s: %s", m->dir, out, err.msg);
}

static void verify_ok(const char *pack, const char *ck, const struct moe_model *pm)
{
    struct moe_pack_report rep;
    struct moe_error err = {0};

    if (moe_pack_verify(pack, ck, &rep, NULL, NULL, &err) != 0)
        FAIL("verify %s against %s: %s", pack, ck ? ck : "(none)", err.msg);
    ASSERT_EQ(rep.mismatches, 0);
    ASSERT_EQ(rep.experts_checked, (uint64_t)pm->n_moe_layers * (uint64_t)pm->cfg.n_experts);
    ASSERT_EQ(rep.tensors_checked, pm->headers[0]->n_tensors);
    ASSERT_EQ(rep.bytes_checked, pm->files[0].size);
}

struct progress_rec {
    int calls;
    uint64_t last, total;
    bool backwards;
};

static void record_progress(void *ctx, uint64_t done, uint64_t total)
{
    struct progress_rec *p = ctx;

    p->backwards |= done < p->last;
    p->calls++;
    p->last = done;
    p->total = total;
}

static void test_roundtrip(enum moe_arch arch, enum moe_dtype dt, int shards)
{
    char *dir = test_tmpdir("pack"), *ck_dir = gen(dir, arch, dt, shards, 0);
    /* Two levels to create. */
    char *out = path_in(dir, "store/v1");
    struct moe_model *ck = NULL, *pm = NULL;
    struct moe_error err = {0};
    struct progress_rec pr = {0};
    char *p1 = path_in(ck_dir, "config.json"), *p2 = path_in(out, "config.json");
    size_t l1, l2, n_routed = 0;
    uint8_t *c1, *c2;
    json_t *ix;

    if (moe_model_open(ck_dir, &ck, &err) < 0)
        FAIL("%s", err.msg);
    if (moe_pack_write(ck, out, false, record_progress, &pr, &err) < 0)
        FAIL("pack %s: %s", moe_arch_name(arch), err.msg);
    ASSERT_TRUE(pr.calls > 0 && !pr.backwards);
    ASSERT_EQ(pr.last, pr.total);
    if (moe_model_open(out, &pm, &err) < 0)
        FAIL("open packed %s: %s", moe_arch_name(arch), err.msg);
    compare_models(ck, pm);

    /* The files of the store, and nothing else. */
    c1 = slurp(p1, &l1);
    c2 = slurp(p2, &l2);
    ASSERT_EQ(l1, l2);
    ASSERT_TRUE(memcmp(c1, c2, l1) == 0);
    ASSERT_TRUE(exists(out, MOE_PACK_INDEX) && exists(out, MOE_PACK_DATA));
    ASSERT_TRUE(!exists(out, MOE_PACK_INDEX ".tmp") && !exists(out, "config.json.tmp"));
    {
        char *ixp = path_in(out, MOE_PACK_INDEX);

        ix = json_load_file(ixp, 0, NULL);
        free(ixp);
    }
    ASSERT_TRUE(ix != NULL);
    ASSERT_EQ(json_integer_value(json_object_get(ix, "data_bytes")), pm->files[0].size);
    ASSERT_EQ(json_array_size(json_object_get(json_object_get(ix, "source"), "files")),
              ck->n_files);
    for (int i = 0; i < pm->cfg.n_layers; i++)
        n_routed += pm->layers[i].is_moe ? (size_t)pm->cfg.n_experts : 0;
    ASSERT_EQ(json_array_size(json_object_get(ix, "experts")), n_routed);
    json_decref(ix);

    verify_ok(out, NULL, pm);
    verify_ok(out, ck_dir, pm);

    /* Packing the store itself gives the same experts.bin. */
    {
        char *out2 = path_in(dir, "store2");
        char *d1 = path_in(out, MOE_PACK_DATA), *d2 = path_in(out2, MOE_PACK_DATA);
        uint8_t *b1, *b2;
        size_t n1, n2;

        pack_ok(pm, out2, false);
        b1 = slurp(d1, &n1);
        b2 = slurp(d2, &n2);
        ASSERT_EQ(n1, n2);
        ASSERT_TRUE(memcmp(b1, b2, n1) == 0);
        free(b1);
        free(b2);
        free(d1);
        free(d2);
        free(out2);
    }

    printf("  %s %s %d shard(s): %zu tensors, %" PRIu64 " bytes\n", moe_arch_name(arch),
           moe_dtype_name(dt), shards, pm->headers[0]->n_tensors, pm->files[0].size);
    free(c1);
    free(c2);
    free(p1);
    free(p2);
    moe_model_free(pm);
    moe_model_free(ck);
    test_rmtree(dir);
    free(out);
    free(ck_dir);
    free(dir);
}

/* Flips the byte at off of path. */
static void flip(const char *path, uint64_t off)
{
    int fd = open(path, O_RDWR);
    uint8_t b;

    ASSERT_TRUE(fd >= 0);
    ASSERT_EQ(pread(fd, &b, 1, (off_t)off), 1);
    b ^= 0x40;
    ASSERT_EQ(pwrite(fd, &b, 1, (off_t)off), 1);
    close(fd);
}

/*
 * A store of transposed experts (gpt-oss's, made plain when packed) is
 * checked against its checkpoint expert by expert made plain: a byte of
 * the checkpoint's gate_up_proj changed after packing is a mismatch named
 * by the store's tensor, and so is a changed expert bias.
 */
static void test_transposed_changed(void)
{
    char *dir = test_tmpdir("pack-t"), *ck_dir = gen(dir, MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, 0, 0);
    char *out = path_in(dir, "store"), *st = path_in(ck_dir, "model.safetensors");
    struct moe_model *ck = NULL;
    struct moe_pack_report rep;
    struct moe_error err = {0};
    const struct moe_expert_ref *x;
    uint64_t at, bias_at;

    ASSERT_EQ(moe_model_open(ck_dir, &ck, &err), 0);
    pack_ok(ck, out, false);
    x = &ck->layers[1].experts[2];
    /* Element (h 0, column 3) of gate_up_proj[2]: expert 2's up row 1. */
    at = x->gate.offset + 3 * moe_dtype_size(x->gate.dtype);
    bias_at = ck->layers[2].down_bias.offset;
    moe_model_free(ck);
    flip(st, at);
    ASSERT_EQ(moe_pack_verify(out, ck_dir, &rep, NULL, NULL, &err), -EBADMSG);
    ASSERT_EQ(rep.mismatches, 1);
    ASSERT_CONTAINS(err.msg, "layer 1 expert 2: tensor 'model.layers.1.mlp.experts.2.up_proj."
                             "weight': differs from the checkpoint's");
    flip(st, at);
    flip(st, bias_at);
    ASSERT_EQ(moe_pack_verify(out, ck_dir, &rep, NULL, NULL, &err), -EBADMSG);
    ASSERT_EQ(rep.mismatches, 1);
    ASSERT_CONTAINS(err.msg, "tensor 'model.layers.2.mlp.experts.down_proj_bias': differs from "
                             "the checkpoint's");
    flip(st, bias_at);
    ASSERT_EQ(moe_pack_verify(out, ck_dir, &rep, NULL, NULL, &err), 0);
    test_rmtree(dir);
    free(st);
    free(out);
    free(ck_dir);
    free(dir);
}

static void test_corruption(void)
{
    char *dir = test_tmpdir("pack-bad"),
         *ck_dir = gen(dir, MOE_ARCH_QWEN2_MOE, MOE_DTYPE_BF16, 1, 0);
    char *out = path_in(dir, "store"), *data = path_in(out, MOE_PACK_DATA);
    struct moe_model *ck = NULL, *pm = NULL;
    struct moe_pack_report rep;
    struct moe_error err = {0};
    const struct moe_expert_ref *x;
    const struct moe_tensor_ref *router;
    char want[128];

    if (moe_model_open(ck_dir, &ck, &err) < 0)
        FAIL("%s", err.msg);
    pack_ok(ck, out, false);
    if (moe_model_open(out, &pm, &err) < 0)
        FAIL("%s", err.msg);
    x = &pm->layers[1].experts[2];
    router = &pm->layers[2].router;

    /* One byte of layer 1 expert 2's up matrix. */
    flip(data, x->up.offset + 17);
    ASSERT_EQ(moe_pack_verify(out, NULL, &rep, NULL, NULL, &err), -EBADMSG);
    ASSERT_EQ(err.code, -EBADMSG);
    ASSERT_CONTAINS(err.msg, "layer 1 expert 2: checksum mismatch: index says ");
    ASSERT_CONTAINS(err.msg, ", experts.bin has ");
    ASSERT_CONTAINS(err.msg, x->up.name);
    ASSERT_EQ(rep.mismatches, 1);
    ASSERT_EQ(rep.experts_checked, 3 * 4);
    /* Against the checkpoint: still one (the same tensor). */
    ASSERT_EQ(moe_pack_verify(out, ck_dir, &rep, NULL, NULL, &err), -EBADMSG);
    ASSERT_CONTAINS(err.msg, "layer 1 expert 2: checksum mismatch");
    ASSERT_EQ(rep.mismatches, 1);
    /* The store still opens: checksums are the pager's and verify's. */
    {
        struct moe_model *again = NULL;

        ASSERT_EQ(moe_model_open(out, &again, &err), 0);
        moe_model_free(again);
    }

    /* And a router: named by its tensor; two mismatches now, the first
     * (lowest offset) reported. */
    flip(data, router->offset + 3);
    ASSERT_EQ(moe_pack_verify(out, NULL, &rep, NULL, NULL, &err), -EBADMSG);
    ASSERT_EQ(rep.mismatches, 2);
    ASSERT_CONTAINS(err.msg, "layer 1 expert 2");
    flip(data, x->up.offset + 17);
    ASSERT_EQ(moe_pack_verify(out, NULL, &rep, NULL, NULL, &err), -EBADMSG);
    ASSERT_EQ(rep.mismatches, 1);
    snprintf(want, sizeof(want), "tensor '%s': checksum mismatch", router->name);
    ASSERT_CONTAINS(err.msg, want);
    flip(data, router->offset + 3);
    verify_ok(out, ck_dir, pm);

    /* Padding is not data. */
    flip(data, pm->files[0].size - 1);
    verify_ok(out, NULL, pm);
    flip(data, pm->files[0].size - 1);

    /* Compared with another checkpoint of the same shapes: every tensor
     * differs (the checksums match: the store is intact). */
    {
        char *other = gen(dir, MOE_ARCH_QWEN2_MOE, MOE_DTYPE_BF16, 1, 7);

        ASSERT_EQ(moe_pack_verify(out, other, &rep, NULL, NULL, &err), -EBADMSG);
        ASSERT_EQ(rep.mismatches, pm->headers[0]->n_tensors);
        ASSERT_CONTAINS(err.msg, "layer 0 expert 0: tensor 'model.layers.0.mlp.experts.0.");
        ASSERT_CONTAINS(err.msg, "differs from the checkpoint's");
        free(other);
    }

    /* A truncated experts.bin: refused at open, by verify too. */
    ASSERT_EQ(truncate(data, (off_t)(pm->files[0].size - MOE_PACK_ALIGN)), 0);
    {
        struct moe_model *t = NULL;

        ASSERT_EQ(moe_model_open(out, &t, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, data);
        ASSERT_CONTAINS(err.msg, "but moe-pack.json says data_bytes");
        ASSERT_EQ(moe_pack_verify(out, NULL, &rep, NULL, NULL, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "data_bytes");
    }
    unlink(data);
    {
        struct moe_model *t = NULL;

        ASSERT_EQ(moe_model_open(out, &t, &err), -ENOENT);
        ASSERT_CONTAINS(err.msg, "named in");
    }

    moe_model_free(pm);
    moe_model_free(ck);
    test_rmtree(dir);
    free(data);
    free(out);
    free(ck_dir);
    free(dir);
}

/* ---- edited indexes that parse but do not fit the model --------------------- */

typedef void (*edit_fn)(json_t *ix);

static json_t *tensor_entry(json_t *ix, const char *name)
{
    json_t *t = json_object_get(json_object_get(ix, "tensors"), name);

    if (!t)
        FAIL("test bug: no tensor %s", name);
    return t;
}

static void edit_drop_expert(json_t *ix)
{
    json_t *ex = json_object_get(ix, "experts");

    json_array_remove(ex, json_array_size(ex) - 1);
}

static void edit_dtype(json_t *ix)
{
    json_object_set_new(tensor_entry(ix, "model.layers.1.mlp.experts.3.up_proj.weight"), "dtype",
                        json_string("F16"));
}

static void edit_shape(json_t *ix)
{
    json_object_set_new(tensor_entry(ix, "model.layers.0.mlp.experts.1.down_proj.weight"), "shape",
                        json_pack("[i, i]", 24, 40));
}

static void edit_drop_tensor(json_t *ix)
{
    json_object_del(json_object_get(ix, "tensors"), "model.layers.2.mlp.gate.weight");
}

/* Up and down swapped: the blob is no longer gate, up, down in order. */
static void edit_swap(json_t *ix)
{
    json_t *u = tensor_entry(ix, "model.layers.0.mlp.experts.0.up_proj.weight");
    json_t *d = tensor_entry(ix, "model.layers.0.mlp.experts.0.down_proj.weight");
    json_t *uo = json_incref(json_object_get(u, "offset"));

    json_object_set(u, "offset", json_object_get(d, "offset"));
    json_object_set_new(d, "offset", uo);
}

static void edit_extra_layer(json_t *ix)
{
    json_t *e = json_array_get(json_object_get(ix, "experts"), 0);

    json_object_set_new(e, "layer", json_integer(7));
}

static void edit_bad_data(json_t *ix)
{
    json_object_set_new(ix, "data", json_string("../ck/model.safetensors"));
}

static void test_edited_indexes(void)
{
    static const struct {
        const char *desc;
        edit_fn edit;
        int code;
        const char *msg;
    } cases[] = {
        /* Its tensors are then outside any blob, and not aligned. */
        {"expert entry missing", edit_drop_expert, -EINVAL,
         "'model.layers.2.mlp.experts.3.up_proj.weight': 'offset' is"},
        {"dtype", edit_dtype, -EINVAL, "dtype F16 contradicts config.json"},
        {"shape", edit_shape, -EINVAL, "shape [24, 40] contradicts config.json"},
        {"router missing", edit_drop_tensor, -EINVAL, "no tensor 'model.layers.2.mlp.gate.weight'"},
        {"up and down swapped", edit_swap, -EINVAL,
         "layer 0 expert 0: blob [0, +5760) is not its gate, up and down (then their scales) back "
         "to back"},
        {"entry moved to a layer past the model", edit_extra_layer, -EINVAL,
         "layer 0 expert 0: no entry in 'experts'"},
        {"data a path", edit_bad_data, -EINVAL, "'data' is \"../ck/model.safetensors\""},
    };
    char *dir = test_tmpdir("pack-edit"), *ck_dir = gen(dir, MOE_ARCH_OLMOE, MOE_DTYPE_BF16, 1, 0);
    char *out = path_in(dir, "store"), *ixp = path_in(out, MOE_PACK_INDEX);
    struct moe_model *ck = NULL;
    struct moe_error err = {0};
    json_t *orig;

    if (moe_model_open(ck_dir, &ck, &err) < 0)
        FAIL("%s", err.msg);
    pack_ok(ck, out, false);
    orig = json_load_file(ixp, 0, NULL);
    ASSERT_TRUE(orig != NULL);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++) {
        json_t *ix = json_deep_copy(orig);
        struct moe_model *m = NULL;
        int r;

        cases[i].edit(ix);
        ASSERT_EQ(json_dump_file(ix, ixp, JSON_INDENT(1)), 0);
        json_decref(ix);
        memset(&err, 0, sizeof(err));
        r = moe_model_open(out, &m, &err);
        if (r != cases[i].code || !strstr(err.msg, cases[i].msg))
            FAIL("edited index '%s': got %d \"%s\", expected %d with \"%s\"", cases[i].desc, r,
                 err.msg, cases[i].code, cases[i].msg);
        ASSERT_CONTAINS(err.msg, out);
    }
    /* The extra entry on its own (expert 0 of layer 0 still present). */
    {
        json_t *ix = json_deep_copy(orig), *ex = json_object_get(ix, "experts");
        json_t *e = json_deep_copy(json_array_get(ex, 0));
        struct moe_model *m = NULL;
        json_int_t db = json_integer_value(json_object_get(ix, "data_bytes"));

        /* Layer 0 expert 4 (of 4 experts: 0..3), in two new pages past the data. */
        json_object_set_new(e, "expert", json_integer(4));
        json_object_set_new(e, "offset", json_integer(db));
        json_object_set_new(ix, "data_bytes", json_integer(db + 2 * MOE_PACK_ALIGN));
        json_array_append_new(ex, e);
        ASSERT_EQ(json_dump_file(ix, ixp, JSON_INDENT(1)), 0);
        json_decref(ix);
        {
            char *data = path_in(out, MOE_PACK_DATA);

            ASSERT_EQ(truncate(data, (off_t)(db + 2 * MOE_PACK_ALIGN)), 0);
            free(data);
        }
        ASSERT_EQ(moe_model_open(out, &m, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "'experts' has layer 0 expert 4, which config.json does not have");
    }
    json_decref(orig);
    moe_model_free(ck);
    test_rmtree(dir);
    free(ixp);
    free(out);
    free(ck_dir);
    free(dir);
}

/* ---- refusals and failures ------------------------------------------------- */

static void test_refusals(void)
{
    char *dir = test_tmpdir("pack-refuse"),
         *ck_dir = gen(dir, MOE_ARCH_MIXTRAL, MOE_DTYPE_F32, 2, 0);
    char *out = path_in(dir, "store"), *other = path_in(dir, "other");
    struct moe_model *ck = NULL, *pm = NULL;
    struct moe_error err = {0};

    if (moe_model_open(ck_dir, &ck, &err) < 0)
        FAIL("%s", err.msg);
    pack_ok(ck, out, false);

    /* An existing store: refused, and left as it was. */
    ASSERT_EQ(moe_pack_write(ck, out, false, NULL, NULL, &err), -EEXIST);
    ASSERT_CONTAINS(err.msg, "already holds a packed store");
    ASSERT_CONTAINS(err.msg, "--force");
    ASSERT_EQ(moe_model_open(out, &pm, &err), 0);
    verify_ok(out, ck_dir, pm);
    moe_model_free(pm);
    /* Unless overwriting. */
    pack_ok(ck, out, true);
    ASSERT_EQ(moe_model_open(out, &pm, &err), 0);
    verify_ok(out, ck_dir, pm);

    /* The checkpoint's own directory (also spelt differently), or the
     * store's when repacking the store. */
    {
        char *alias = path_in(ck_dir, ".");

        ASSERT_EQ(moe_pack_write(ck, ck_dir, true, NULL, NULL, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "is the directory of the model being packed");
        ASSERT_EQ(moe_pack_write(ck, alias, true, NULL, NULL, &err), -EINVAL);
        ASSERT_TRUE(!exists(ck_dir, MOE_PACK_DATA) && !exists(ck_dir, MOE_PACK_INDEX));
        ASSERT_EQ(moe_pack_write(pm, out, true, NULL, NULL, &err), -EINVAL);
        ASSERT_TRUE(exists(out, MOE_PACK_DATA) && exists(out, MOE_PACK_INDEX));
        free(alias);
    }
    moe_model_free(pm);
    ASSERT_EQ(moe_model_open(out, &pm, &err), 0);
    verify_ok(out, ck_dir, pm);
    moe_model_free(pm);

    /* A directory holding a checkpoint, even with overwrite. */
    {
        char *other_ck = gen(other, MOE_ARCH_MIXTRAL, MOE_DTYPE_F32, 1, 0);

        ASSERT_EQ(moe_pack_write(ck, other_ck, true, NULL, NULL, &err), -EEXIST);
        ASSERT_CONTAINS(err.msg, "holds a checkpoint (model.safetensors)");
        ASSERT_TRUE(!exists(other_ck, MOE_PACK_DATA));
        free(other_ck);
    }

    /* A file in the way. */
    {
        char *f = path_in(dir, "afile");
        FILE *fp = fopen(f, "w");

        ASSERT_TRUE(fp != NULL);
        fclose(fp);
        ASSERT_EQ(moe_pack_write(ck, f, false, NULL, NULL, &err), -ENOTDIR);
        ASSERT_CONTAINS(err.msg, "not a directory");
        free(f);
    }

    /* experts.bin cannot be created: nothing of the store is left. */
    {
        char *o2 = path_in(dir, "o2"), *blocker = path_in(o2, MOE_PACK_DATA);

        ASSERT_EQ(mkdir(o2, 0755), 0);
        ASSERT_EQ(mkdir(blocker, 0755), 0);
        ASSERT_EQ(moe_pack_write(ck, o2, false, NULL, NULL, &err), -EISDIR);
        ASSERT_CONTAINS(err.msg, blocker);
        ASSERT_TRUE(!exists(o2, MOE_PACK_INDEX) && !exists(o2, "config.json"));
        free(blocker);
        free(o2);
    }

    /* A shard truncated after the model was opened: the read fails half
     * way, named, and the new directory is gone. */
    {
        char *o3 = path_in(dir, "o3"), *shard = path_in(ck_dir, ck->files[1].name);
        char want[256];

        ASSERT_EQ(truncate(shard, (off_t)(ck->files[1].size / 2)), 0);
        ASSERT_EQ(moe_pack_write(ck, o3, false, NULL, NULL, &err), -EIO);
        snprintf(want, sizeof(want), "%s: tensor '", shard);
        ASSERT_CONTAINS(err.msg, want);
        ASSERT_CONTAINS(err.msg, "short read");
        ASSERT_TRUE(!exists(dir, "o3"));
        /* Over an old store: its index was removed first, so no store. */
        ASSERT_EQ(moe_pack_write(ck, out, true, NULL, NULL, &err), -EIO);
        ASSERT_TRUE(!exists(out, MOE_PACK_INDEX) && !exists(out, MOE_PACK_DATA));
        free(shard);
        free(o3);
    }

    moe_model_free(ck);
    test_rmtree(dir);
    free(other);
    free(out);
    free(ck_dir);
    free(dir);
}

/* ---- the parser ----------------------------------------------------------- */

/* A small valid index: two experts (blobs at 0 and 4096), a router at 8192. */
static const char base[] =
    "{\"format\":\"moed-pack\",\"version\":1,\"alignment\":4096,\"data\":\"experts.bin\","
    "\"data_bytes\":12288,\"source\":{\"files\":[{\"name\":\"model.safetensors\",\"size\":100}]},"
    "\"tensors\":{"
    "\"a\":{\"dtype\":\"BF16\",\"shape\":[4,8],\"offset\":0,\"nbytes\":64,"
    "\"xxh3\":\"0123456789abcdef\"},"
    "\"b\":{\"dtype\":\"BF16\",\"shape\":[4,8],\"offset\":64,\"nbytes\":64,"
    "\"xxh3\":\"00000000000000ff\"},"
    "\"c\":{\"dtype\":\"F32\",\"shape\":[16],\"offset\":4096,\"nbytes\":64,"
    "\"xxh3\":\"00000000000000fe\"},"
    "\"r\":{\"dtype\":\"F32\",\"shape\":[2,8],\"offset\":8192,\"nbytes\":64,"
    "\"xxh3\":\"0000000000000000\"}},"
    "\"experts\":[{\"layer\":0,\"expert\":1,\"offset\":4096,\"nbytes\":64,"
    "\"xxh3\":\"fedcba9876543210\"},"
    "{\"layer\":0,\"expert\":0,\"offset\":0,\"nbytes\":128,\"xxh3\":\"1111111111111111\"}]}";

/* base with the first occurrence of old replaced by new. */
static char *variant(const char *old, const char *new)
{
    const char *at = strstr(base, old);
    char *s;

    if (!at)
        FAIL("test bug: '%s' not in the base index", old);
    if (asprintf(&s, "%.*s%s%s", (int)(at - base), base, new, at + strlen(old)) < 0)
        FAIL("asprintf");
    return s;
}

static void test_parse_good(void)
{
    struct moe_pack_index ix = {0};
    struct moe_error err = {0};
    const struct moe_pack_entry *e;

    if (moe_pack_index_parse(base, strlen(base), "ix.json", &ix, &err) < 0)
        FAIL("base index: %s", err.msg);
    ASSERT_EQ(ix.data_bytes, 12288);
    ASSERT_STREQ(ix.data_name, "experts.bin");
    ASSERT_EQ(ix.tensors->n_tensors, 4);
    ASSERT_EQ(ix.tensors->file_size, 12288);
    ASSERT_STREQ(ix.tensors->tensors[0].name, "a");
    ASSERT_STREQ(ix.tensors->tensors[3].name, "r");
    ASSERT_EQ(ix.tensor_xxh3[0], 0x0123456789abcdefull);
    ASSERT_EQ(ix.tensor_xxh3[1], 0xff);
    ASSERT_EQ(ix.tensors->tensors[2].ndim, 1);
    ASSERT_EQ(ix.tensors->tensors[2].offset, 4096);
    ASSERT_EQ(ix.tensors->tensors[3].nbytes, 64);
    ASSERT_EQ(ix.n_experts, 2);
    ASSERT_EQ(ix.experts[0].expert, 0); /* sorted by key */
    e = moe_pack_index_find(&ix, 0, 1);
    ASSERT_TRUE(e != NULL);
    ASSERT_EQ(e->offset, 4096);
    ASSERT_EQ(e->xxh3, 0xfedcba9876543210ull);
    ASSERT_TRUE(moe_pack_index_find(&ix, 1, 0) == NULL);
    ASSERT_TRUE(moe_st_header_find(ix.tensors, "b") != NULL);
    moe_pack_index_clear(&ix);
    moe_pack_index_clear(&ix);
    ASSERT_TRUE(ix.tensors == NULL && ix.experts == NULL);
}

static void test_parse_bad(void)
{
    static const struct {
        const char *old, *new, *msg;
    } cases[] = {
        {"{\"format\"", "[{\"format\"", "not valid JSON"},
        {"\"version\":1,", "\"version\":1,\"version\":1,", "duplicate"},
        {"\"moed-pack\"", "\"safetensors\"", "'format' is \"safetensors\": expected \"moed-pack\""},
        {"\"format\":\"moed-pack\",", "", "'format' is missing"},
        {"\"version\":1", "\"version\":2", "'version' is 2: this moed reads version 1"},
        {"\"version\":1", "\"version\":1.0", "'version' is 1.0 (a real number)"},
        {"\"alignment\":4096", "\"alignment\":512", "'alignment' is 512: expected 4096"},
        {"\"data\":\"experts.bin\"", "\"data\":\"../x.bin\"", "'data' is \"../x.bin\": a path"},
        {"\"data\":\"experts.bin\"", "\"data\":7", "'data' is 7 (an integer)"},
        {"\"data_bytes\":12288", "\"data_bytes\":12289",
         "'data_bytes' is 12289: expected a "
         "multiple of 4096"},
        {"\"data_bytes\":12288", "\"data_bytes\":-4096", "'data_bytes' is -4096"},
        {"\"data_bytes\":12288", "\"data_bytes\":1125899906846720",
         "'data_bytes' is 1125899906846720 (an integer): expected an integer from 0 to "
         "1125899906842624"},
        {"\"data_bytes\":12288", "\"data_bytes\":99999999999999999999", "not valid JSON"},
        {"\"source\"", "\"sauce\"", "'source' is missing"},
        {"\"size\":100", "\"size\":\"big\"", "source.files[0]: 'size' is \"big\""},
        {"\"tensors\"", "\"tensorz\"", "'tensors' is missing"},
        {"\"experts\":[", "\"experts\":[],\"x\":[",
         "'experts' is []: expected an array of at "
         "least one"},
        {"\"r\":{", "\"r\":[],\"r2\":{", "tensors: 'r': is [] (an array)"},
        {"\"BF16\"", "\"Q4_K\"", "tensors: 'a': 'dtype' is \"Q4_K\""},
        {"\"shape\":[4,8]", "\"shape\":\"4x8\"", "tensors: 'a': 'shape' is \"4x8\""},
        {"\"shape\":[4,8]", "\"shape\":[4,-8]", "dimension 1 is not a non-negative integer"},
        {"\"shape\":[4,8]", "\"shape\":[4294967296,4294967296,4]", "more than 2^64 elements"},
        {"\"shape\":[4,8]", "\"shape\":[4,8,1,1,1,1,1,1,1]", "at most 8 dimensions"},
        {"\"nbytes\":64", "\"nbytes\":65",
         "tensors: 'a': 'nbytes' is 65: expected dtype BF16 x "
         "shape [4, 8] = 64"},
        {",\"nbytes\":64,\"xxh3\":\"0123", ",\"xxh3\":\"0123", "tensors: 'a': 'nbytes' is missing"},
        {"\"offset\":8192", "\"offset\":12256",
         "tensors: 'r': bytes [12256, 12320) run past "
         "data_bytes (12288)"},
        {"\"offset\":8192", "\"offset\":8200",
         "tensors: 'r': 'offset' is 8200: expected a "
         "multiple of 4096"},
        {"\"offset\":64", "\"offset\":32", "tensors: 'a' [0, 64) and 'b' [32, 96) overlap"},
        {"\"offset\":64", "\"offset\":100",
         "'b' [100, 164) straddles the edge of the blob of "
         "layer 0 expert 0 [0, 128)"},
        {"\"0123456789abcdef\"", "\"0123456789ABCDEF\"",
         "tensors: 'a': 'xxh3' is "
         "\"0123456789ABCDEF\": expected 16 "
         "lower-case hex digits"},
        {"\"0123456789abcdef\"", "\"0123456789abcde\"", "'xxh3' is \"0123456789abcde\""},
        {"\"0123456789abcdef\"", "\"0x23456789abcdef\"", "'xxh3' is \"0x23456789abcdef\""},
        {"\"experts\":[", "\"experts\":[7,", "experts[0]: is 7 (an integer)"},
        {"\"layer\":0,\"expert\":1", "\"layer\":5000,\"expert\":1",
         "experts[0]: 'layer' is 5000 (an integer): expected an integer from 0 to 1023"},
        {"\"layer\":0,\"expert\":1", "\"layer\":0,\"expert\":-1", "experts[0]: 'expert' is -1"},
        {"\"layer\":0,\"expert\":1", "\"expert\":1", "experts[0]: 'layer' is missing"},
        {"\"expert\":1,\"offset\":4096", "\"expert\":1,\"offset\":4000",
         "experts[0] (layer 0 expert 1): 'offset' is 4000: expected a multiple of 4096"},
        {"\"expert\":1,\"offset\":4096,\"nbytes\":64", "\"expert\":1,\"offset\":4096,\"nbytes\":0",
         "experts[0] (layer 0 expert 1): 'nbytes' is 0"},
        {"\"expert\":1,\"offset\":4096,\"nbytes\":64",
         "\"expert\":1,\"offset\":8192,\"nbytes\":8192",
         "experts[0] (layer 0 expert 1): bytes [8192, 16384) run past data_bytes"},
        {"\"expert\":1,\"offset\":4096", "\"expert\":1,\"offset\":0",
         "experts: layer 0 expert 0 [0, 128) and layer 0 expert 1 [0, 64) overlap"},
        {"\"expert\":1,", "\"expert\":0,", "experts: layer 0 expert 0 is listed twice"},
        {",\"xxh3\":\"fedcba9876543210\"", "", "experts[0] (layer 0 expert 1): 'xxh3' is missing"},
        {"\"a\":{", "\"a\\u0000\":{", "not valid JSON"},
    };
    int failed = 0;

    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++) {
        char *json = variant(cases[i].old, cases[i].new);
        struct moe_pack_index ix = {0}, untouched;
        struct moe_error err = {0};
        int r;

        memset(&untouched, 0, sizeof(untouched));
        r = moe_pack_index_parse(json, strlen(json), "ix.json", &ix, &err);
        if (r != -EINVAL || err.code != -EINVAL || !strstr(err.msg, cases[i].msg) ||
            strncmp(err.msg, "ix.json: ", 9) != 0) {
            fprintf(stderr,
                    "bad index %zu (%s -> %s): got %d \"%s\", expected -EINVAL with \"%s\"\n", i,
                    cases[i].old, cases[i].new, r, err.msg, cases[i].msg);
            failed++;
        }
        ASSERT_TRUE(memcmp(&ix, &untouched, sizeof(ix)) == 0);
        free(json);
    }
    if (failed)
        FAIL("%d bad indexes not refused as expected", failed);
    printf("  %zu bad indexes refused\n", MOE_ARRAY_SIZE(cases));
}

int main(void)
{
    static const enum moe_arch archs[] = {
        MOE_ARCH_MIXTRAL,     MOE_ARCH_QWEN2_MOE, MOE_ARCH_QWEN3_MOE, MOE_ARCH_OLMOE,
        MOE_ARCH_DEEPSEEK_V3, MOE_ARCH_LLAMA4,    MOE_ARCH_GPT_OSS};

    test_parse_good();
    test_parse_bad();
    for (size_t i = 0; i < MOE_ARRAY_SIZE(archs); i++)
        test_roundtrip(archs[i], MOE_DTYPE_BF16, 1);
    test_roundtrip(MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_F32, 3);
    test_roundtrip(MOE_ARCH_QWEN2_MOE, MOE_DTYPE_F16, 2);
    test_roundtrip(MOE_ARCH_GPT_OSS, MOE_DTYPE_F32, 3);
    test_transposed_changed();
    test_corruption();
    test_edited_indexes();
    test_refusals();
    printf("test-pack: ok\n");
    return 0;
}
