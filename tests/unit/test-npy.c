/*
 * Tests of client/npy.c: .npy and .npz round trips, files written by the
 * system's numpy read by us and ours read by numpy, and tables of bad input,
 * each refused with the right code and a message saying what is wrong.
 */
#include "npy.h"
#include "tests.h"

#include <errno.h>
#include <stdarg.h>
#include <unistd.h>

#define PYTHON "/usr/bin/python3"

static char *tmp;

static char *tmp_path(const char *name)
{
    char *p;

    if (asprintf(&p, "%s/%s", tmp, name) < 0)
        FAIL("asprintf");
    return p;
}

/* Deterministic test values: f32 i * 0.25 - 3, i32 i * 7 - 100. */
static void fill(enum moe_npy_type t, void *data, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (t == MOE_NPY_F32)
            ((float *)data)[i] = (float)i * 0.25f - 3.0f;
        else
            ((int32_t *)data)[i] = (int32_t)i * 7 - 100;
    }
}

static void check_values(const struct moe_npy *a, enum moe_npy_type t, int ndim,
                         const int64_t *shape)
{
    size_t count = 1;

    ASSERT_EQ(a->type, t);
    ASSERT_EQ(a->ndim, ndim);
    for (int i = 0; i < ndim; i++) {
        ASSERT_EQ(a->shape[i], shape[i]);
        count *= (size_t)shape[i];
    }
    ASSERT_EQ(a->count, count);
    ASSERT_TRUE(a->data != NULL);
    for (size_t i = 0; i < count; i++) {
        if (t == MOE_NPY_F32)
            ASSERT_EQ(((float *)a->data)[i] == (float)i * 0.25f - 3.0f, 1);
        else
            ASSERT_EQ(((int32_t *)a->data)[i], (int32_t)i * 7 - 100);
    }
}

struct shape_case {
    const char *name;
    enum moe_npy_type type;
    int ndim;
    int64_t shape[4];
};

static const struct shape_case shapes[] = {
    {"f32_0d", MOE_NPY_F32, 0, {0}},       {"f32_1d", MOE_NPY_F32, 1, {5}},
    {"f32_2d", MOE_NPY_F32, 2, {3, 4}},    {"f32_3d", MOE_NPY_F32, 3, {2, 3, 4}},
    {"i32_0d", MOE_NPY_I32, 0, {0}},       {"i32_1d", MOE_NPY_I32, 1, {7}},
    {"i32_2d", MOE_NPY_I32, 2, {4, 2}},    {"i32_3d", MOE_NPY_I32, 3, {1, 2, 5}},
    {"f32_empty", MOE_NPY_F32, 2, {0, 3}}, {"f32_4d", MOE_NPY_F32, 4, {2, 1, 3, 2}},
};

static void test_roundtrip(void)
{
    float fbuf[64];
    int32_t ibuf[64];
    struct moe_npz_entry ent[MOE_ARRAY_SIZE(shapes)];
    struct moe_error err = {0};
    struct moe_npy a;
    char *npz = tmp_path("all.npz");

    for (size_t i = 0; i < MOE_ARRAY_SIZE(shapes); i++) {
        const struct shape_case *c = &shapes[i];
        void *buf = c->type == MOE_NPY_F32 ? (void *)fbuf : (void *)ibuf;
        char *name, *path;
        FILE *f;
        long size;

        if (asprintf(&name, "%s.npy", c->name) < 0)
            FAIL("asprintf");
        path = tmp_path(name);
        fill(c->type, buf, 64);
        if (moe_npy_write(path, c->type, c->ndim, c->shape, buf, &err) != 0)
            FAIL("%s: %s", c->name, err.msg);
        /* v1.0 with the data 64-byte aligned, as numpy writes. */
        f = fopen(path, "rb");
        ASSERT_TRUE(f);
        fseek(f, 0, SEEK_END);
        size = ftell(f);
        fclose(f);
        if (moe_npy_read(path, &a, &err) != 0)
            FAIL("%s: %s", c->name, err.msg);
        check_values(&a, c->type, c->ndim, c->shape);
        ASSERT_EQ((size - (long)(a.count * 4)) % 64, 0);
        moe_npy_clear(&a);
        ent[i] = (struct moe_npz_entry){
            .name = c->name, .type = c->type, .ndim = c->ndim, .shape = c->shape, .data = buf};
        free(name);
        free(path);
    }
    /* One archive of them all. */
    if (moe_npz_write(npz, ent, (int)MOE_ARRAY_SIZE(ent), &err) != 0)
        FAIL("npz: %s", err.msg);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(shapes); i++) {
        if (moe_npz_read_array(npz, shapes[i].name, &a, &err) != 0)
            FAIL("npz %s: %s", shapes[i].name, err.msg);
        check_values(&a, shapes[i].type, shapes[i].ndim, shapes[i].shape);
        moe_npy_clear(&a);
    }
    ASSERT_EQ(moe_npz_read_array(npz, "nope", &a, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "no array 'nope'");
    ASSERT_CONTAINS(err.msg, "f32_0d, f32_1d, f32_2d");
    ASSERT_EQ(moe_npz_read_array(npz, "f32_1", &a, &err), -ENOENT);

    /* Writer refusals. */
    {
        int64_t neg[2] = {3, -1};
        struct moe_npz_entry dup[2] = {ent[0], ent[0]};

        ASSERT_EQ(moe_npy_write(npz, MOE_NPY_F32, 2, neg, fbuf, &err), -EINVAL);
        ASSERT_EQ(moe_npy_write(npz, MOE_NPY_F32, 9, neg, fbuf, &err), -EINVAL);
        ASSERT_EQ(moe_npz_write(npz, dup, 2, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "used twice");
    }
    /* Empty archive. */
    ASSERT_EQ(moe_npz_write(npz, NULL, 0, &err), 0);
    ASSERT_EQ(moe_npz_read_array(npz, "x", &a, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "holds no arrays");
    ASSERT_EQ(moe_npy_read("/nonexistent/x.npy", &a, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "/nonexistent/x.npy");
    free(npz);
}

/* ---- hand-made images ----------------------------------------------------- */

/* A .npy image: version major.0, the dict text (padded to 64 with '\n'), then
 * data_len bytes of data. */
static unsigned char *make_npy(int major, const char *dict, size_t data_len, size_t *ret_len)
{
    size_t pre = major == 1 ? 10 : 12, dl = strlen(dict), hl = dl + 1, len;
    unsigned char *b;

    while ((pre + hl) % 64)
        hl++;
    len = pre + hl + data_len;
    b = calloc(1, len);
    memcpy(b, "\x93NUMPY", 6);
    b[6] = (unsigned char)major;
    b[7] = 0;
    if (major == 1) {
        b[8] = (unsigned char)hl;
        b[9] = (unsigned char)(hl >> 8);
    } else {
        b[8] = (unsigned char)hl;
        b[9] = (unsigned char)(hl >> 8);
        b[10] = b[11] = 0;
    }
    memcpy(b + pre, dict, dl);
    memset(b + pre + dl, ' ', hl - dl - 1);
    b[pre + hl - 1] = '\n';
    for (size_t i = 0; i < data_len; i++)
        b[pre + hl + i] = (unsigned char)(i * 37);
    *ret_len = len;
    return b;
}

struct npy_case {
    int major;
    const char *dict;
    long data;       /* bytes of data; -1: what the shape needs */
    int code;        /* 0: accepted */
    const char *msg; /* substring of the error, or for accepted: ndim as text */
};

static const struct npy_case npy_cases[] = {
    /* accepted variants */
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", 48, 0, "2"},
    {1, "{'shape': (3, 4), 'fortran_order': False, 'descr': '<f4'}", 48, 0, "2"},
    {1, "{\"descr\":\"<i4\",\"fortran_order\":False,\"shape\":(5,)}", 20, 0, "1"},
    {1, "{ 'descr' : '<f4' , 'fortran_order' : False , 'shape' : ( 2 , 3 , ) , }", 24, 0, "2"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 4, 0, "0"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3L, 2L), }", 24, 0, "2"},
    {2, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 8, 0, "1"},
    {3, "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", 8, 0, "1"},
    {1, "{'descr': '<f4', 'fortran_order': True, 'shape': (6,), }", 24, 0, "1"},
    {1, "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 6), }", 24, 0, "2"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 5), }", 0, 0, "2"},
    /* refused */
    {4, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 8, -EINVAL,
     "unsupported .npy version 4.0"},
    {1, "{'descr': '<f4' 'fortran_order': False, 'shape': (2,), }", 8, -EINVAL,
     "expected ',' or '}', found ''fortran_order'"},
    {1, "['descr', '<f4']", 8, -EINVAL, "expected '{'"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), } x", 8, -EINVAL,
     "unexpected text after the dictionary"},
    {1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24, -EINVAL,
     "np.ascontiguousarray"},
    {1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8, -EINVAL, "big-endian"},
    {1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", 16, -EINVAL,
     "expected float32 ('<f4') or int32 ('<i4'): convert with x.astype(np.float32)"},
    {1, "{'descr': '|f4', 'fortran_order': False, 'shape': (2,), }", 8, -EINVAL, "dtype '|f4'"},
    {1, "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }", 4, -EINVAL, "dtype '<f2'"},
    {1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 8, -EINVAL,
     "structured dtype"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", 8, -EINVAL,
     "negative dimension"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", 8, -EINVAL,
     "overflows 64 bits"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", 8, -EINVAL,
     "overflows the address space"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }", 8, -EINVAL,
     "overflows the address space"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", 47, -EINVAL,
     "data is 47 bytes but shape (3, 4) of <f4 needs 48: file truncated"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", 16, -EINVAL,
     "has trailing bytes"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (5), }", 20, -EINVAL,
     "shape is not a tuple"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': [5], }", 20, -EINVAL,
     "expected the shape tuple"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (5,), 'x': 1}", 20, -EINVAL,
     "unexpected key 'x'"},
    {1, "{'descr': '<f4', 'shape': (5,), }", 20, -EINVAL, "lacks 'fortran_order'"},
    {1, "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (5,)}", 20, -EINVAL,
     "appears twice"},
    {1, "{'descr': '<f4', 'fortran_order': false, 'shape': (5,)}", 20, -EINVAL,
     "expected True or False"},
    {1, "{'descr': '<f4, 'fortran_order': False, 'shape': (5,)}", 20, -EINVAL,
     "cannot parse the .npy header dictionary"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1), }", 4, -EINVAL,
     "more than 8 dimensions"},
    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,,), }", 8, -EINVAL,
     "expected a dimension"},
};

static void test_bad_npy(void)
{
    struct moe_error err = {0};
    struct moe_npy a;

    for (size_t i = 0; i < MOE_ARRAY_SIZE(npy_cases); i++) {
        const struct npy_case *c = &npy_cases[i];
        size_t len;
        unsigned char *b = make_npy(c->major, c->dict, (size_t)c->data, &len);
        char *path, name[32];
        int r;

        memset(&err, 0, sizeof(err));
        r = moe_npy_parse(b, len, "case.npy", &a, &err);
        if (r != c->code)
            FAIL("case %zu (%s): got %d (%s), expected %d", i, c->dict, r, err.msg, c->code);
        if (c->code == 0) {
            ASSERT_EQ(a.ndim, atoi(c->msg));
            ASSERT_EQ(a.count * 4, (size_t)c->data);
            moe_npy_clear(&a);
        } else {
            ASSERT_CONTAINS(err.msg, c->msg);
            ASSERT_CONTAINS(err.msg, "'case.npy'");
        }
        /* The file reader agrees with the buffer parser. */
        snprintf(name, sizeof(name), "case%zu.npy", i);
        path = tmp_path(name);
        {
            FILE *f = fopen(path, "wb");

            ASSERT_TRUE(f && fwrite(b, 1, len, f) == len);
            fclose(f);
        }
        ASSERT_EQ(moe_npy_read(path, &a, &err), c->code);
        if (c->code == 0)
            moe_npy_clear(&a);
        free(path);
        free(b);
    }

    /* Damage to the prefix. */
    {
        size_t len;
        unsigned char *b =
            make_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", 8, &len);

        ASSERT_EQ(moe_npy_parse(b, 0, "e.npy", &a, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "bad magic");
        ASSERT_EQ(moe_npy_parse(b, 9, "e.npy", &a, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "truncated .npy header");
        ASSERT_EQ(moe_npy_parse(b, 40, "e.npy", &a, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "runs past the end of the file");
        b[0] = 'X';
        ASSERT_EQ(moe_npy_parse(b, len, "e.npy", &a, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "not a .npy file (bad magic)");
        b[0] = 0x93;
        b[8] = 0xff;
        b[9] = 0xff;
        ASSERT_EQ(moe_npy_parse(b, len, "e.npy", &a, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "runs past the end");
        free(b);
    }
}

/* ---- .npz damage ---------------------------------------------------------- */

static unsigned char *read_whole(const char *path, size_t *ret_len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long n;

    ASSERT_TRUE(f);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    b = malloc((size_t)n + 1);
    ASSERT_EQ(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *ret_len = (size_t)n;
    return b;
}

static size_t find_sig(const unsigned char *b, size_t len, uint32_t sig, bool last)
{
    size_t at = SIZE_MAX;

    for (size_t i = 0; i + 4 <= len; i++) {
        uint32_t v = (uint32_t)b[i] | (uint32_t)b[i + 1] << 8 | (uint32_t)b[i + 2] << 16 |
                     (uint32_t)b[i + 3] << 24;

        if (v == sig) {
            at = i;
            if (!last)
                break;
        }
    }
    ASSERT_NE(at, SIZE_MAX);
    return at;
}

static void test_bad_npz(void)
{
    struct moe_error err = {0};
    struct moe_npy a;
    int32_t ids[6] = {1, 2, 3, 4, 5, 6};
    float w[6] = {0.5f, 1, 2, 3, 4, 5};
    int64_t shape[2] = {3, 2};
    struct moe_npz_entry ent[2] = {
        {.name = "ids", .type = MOE_NPY_I32, .ndim = 2, .shape = shape, .data = ids},
        {.name = "weights", .type = MOE_NPY_F32, .ndim = 2, .shape = shape, .data = w},
    };
    char *path = tmp_path("r.npz");
    unsigned char *b, *c;
    size_t len, cd, eocd, local;

    if (moe_npz_write(path, ent, 2, &err) != 0)
        FAIL("%s", err.msg);
    b = read_whole(path, &len);
    ASSERT_EQ(moe_npz_parse_array(b, len, "r.npz", "weights", &a, &err), 0);
    ASSERT_EQ(a.type, MOE_NPY_F32);
    ASSERT_EQ(((float *)a.data)[5] == 5.0f, 1);
    moe_npy_clear(&a);
    ASSERT_EQ(moe_npz_parse_array(b, len, "r.npz", "x", &a, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "'r.npz' has no array 'x' (it holds: ids, weights)");

    c = malloc(len);
    /* Every truncation is refused cleanly (ASan checks the reads). */
    for (size_t cut = 0; cut < len; cut++) {
        memcpy(c, b, cut);
        ASSERT_TRUE(moe_npz_parse_array(c, cut, "r.npz", "ids", &a, &err) < 0);
    }
    ASSERT_EQ(moe_npz_parse_array(b, 10, "r.npz", "ids", &a, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "too short");
    memset(c, 0, len);
    ASSERT_EQ(moe_npz_parse_array(c, len, "r.npz", "ids", &a, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "no end of central directory");

    cd = find_sig(b, len, 0x02014b50u, false);
    eocd = find_sig(b, len, 0x06054b50u, true);
    local = find_sig(b, len, 0x04034b50u, false);

    /* Flip one data byte of 'ids': CRC mismatch. */
    memcpy(c, b, len);
    c[local + 30 + 7 + 64 + 2] ^= 1;
    ASSERT_EQ(moe_npz_parse_array(c, len, "r.npz", "ids", &a, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "CRC-32");
    /* The other array is intact. */
    ASSERT_EQ(moe_npz_parse_array(c, len, "r.npz", "weights", &a, &err), 0);
    moe_npy_clear(&a);

    /* Deflated entry (method 8 in the central directory). */
    memcpy(c, b, len);
    c[cd + 10] = 8;
    ASSERT_EQ(moe_npz_parse_array(c, len, "r.npz", "ids", &a, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg,
                    "compressed .npz (np.savez_compressed) is not supported: use np.savez");

    /* Central directory offset past the end. */
    memcpy(c, b, len);
    c[eocd + 19] = 0x7f;
    ASSERT_EQ(moe_npz_parse_array(c, len, "r.npz", "ids", &a, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "outside the file");

    /* Local header offset pointing into the central directory. */
    memcpy(c, b, len);
    c[cd + 42] = (unsigned char)(len - 30);
    c[cd + 43] = (unsigned char)((len - 30) >> 8);
    ASSERT_EQ(moe_npz_parse_array(c, len, "r.npz", "ids", &a, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "local header");

    /* Entry size larger than what is there. */
    memcpy(c, b, len);
    c[cd + 20] = c[cd + 24] = 0xff;
    c[cd + 21] = c[cd + 25] = 0x7f;
    ASSERT_EQ(moe_npz_parse_array(c, len, "r.npz", "ids", &a, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "runs past");

    /* Entry count larger than the directory. */
    memcpy(c, b, len);
    c[eocd + 10] = 9;
    ASSERT_EQ(moe_npz_parse_array(c, len, "r.npz", "nope", &a, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "corrupt");

    /* The same archive with a zip64 end of central directory (as zip writes
     * past 65535 entries or 4 GiB) reads the same. */
    {
        unsigned char *z = malloc(len + 76);
        unsigned char *r64 = z + eocd, *loc = r64 + 56, *e = loc + 20;
        uint64_t cd_size = eocd - cd;

        memcpy(z, b, eocd);
        memset(r64, 0, 76);
        memcpy(r64, "PK\x06\x06", 4);
        r64[4] = 44;
        r64[12] = 45;
        r64[14] = 45;
        r64[24] = 2;
        r64[32] = 2;
        for (int k = 0; k < 8; k++) {
            r64[40 + k] = (unsigned char)(cd_size >> (8 * k));
            r64[48 + k] = (unsigned char)((uint64_t)cd >> (8 * k));
            loc[8 + k] = (unsigned char)((uint64_t)eocd >> (8 * k));
        }
        memcpy(loc, "PK\x06\x07", 4);
        loc[16] = 1;
        memcpy(e, b + eocd, len - eocd);
        memset(e + 8, 0xff, 12);
        ASSERT_EQ(moe_npz_parse_array(z, len + 76, "r64.npz", "weights", &a, &err), 0);
        ASSERT_EQ(((float *)a.data)[0] == 0.5f, 1);
        moe_npy_clear(&a);
        /* A locator pointing nowhere. */
        loc[8] ^= 0x40;
        ASSERT_EQ(moe_npz_parse_array(z, len + 76, "r64.npz", "weights", &a, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "zip64");
        free(z);
    }

    /* zip64 markers without a locator. */
    memcpy(c, b, len);
    c[eocd + 16] = c[eocd + 17] = c[eocd + 18] = c[eocd + 19] = 0xff;
    ASSERT_EQ(moe_npz_parse_array(c, len, "r.npz", "ids", &a, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "zip64");
    free(c);
    free(b);
    free(path);
}

/* ---- numpy interop -------------------------------------------------------- */

static int py(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int py(const char *fmt, ...)
{
    char *script, *cmd;
    va_list ap;
    int r;

    va_start(ap, fmt);
    if (vasprintf(&script, fmt, ap) < 0)
        FAIL("vasprintf");
    va_end(ap);
    if (asprintf(&cmd, PYTHON " -c \"%s\"", script) < 0)
        FAIL("asprintf");
    r = system(cmd);
    free(cmd);
    free(script);
    return r;
}

static void test_numpy_reads_ours(void)
{
    float f[24];
    int32_t i32[6];
    int64_t s2[2] = {4, 6}, s1[1] = {6}, s3[3] = {2, 3, 4};
    struct moe_error err = {0};
    char *d = tmp;
    char *p;

    fill(MOE_NPY_F32, f, 24);
    fill(MOE_NPY_I32, i32, 6);
    p = tmp_path("ours2d.npy");
    ASSERT_EQ(moe_npy_write(p, MOE_NPY_F32, 2, s2, f, &err), 0);
    free(p);
    p = tmp_path("ours0d.npy");
    ASSERT_EQ(moe_npy_write(p, MOE_NPY_F32, 0, NULL, f + 3, &err), 0);
    free(p);
    p = tmp_path("ours1d.npy");
    ASSERT_EQ(moe_npy_write(p, MOE_NPY_I32, 1, s1, i32, &err), 0);
    free(p);
    {
        struct moe_npz_entry ent[3] = {
            {.name = "ids", .type = MOE_NPY_I32, .ndim = 1, .shape = s1, .data = i32},
            {.name = "weights", .type = MOE_NPY_F32, .ndim = 3, .shape = s3, .data = f},
            {.name = "scalar", .type = MOE_NPY_F32, .ndim = 0, .shape = NULL, .data = f + 1},
        };

        p = tmp_path("ours.npz");
        if (moe_npz_write(p, ent, 3, &err) != 0)
            FAIL("%s", err.msg);
        free(p);
    }
    if (py("import numpy as np, zipfile, sys\n"
           "d = '%s'\n"
           "f = np.arange(24, dtype=np.float32) * 0.25 - 3\n"
           "i = np.arange(6, dtype=np.int32) * 7 - 100\n"
           "a = np.load(d + '/ours2d.npy')\n"
           "assert a.dtype == np.float32 and a.shape == (4, 6) and (a.ravel() == f).all(), a\n"
           "a = np.load(d + '/ours0d.npy')\n"
           "assert a.shape == () and a == f[3], a\n"
           "a = np.load(d + '/ours1d.npy')\n"
           "assert a.dtype == np.int32 and (a == i).all(), a\n"
           "z = np.load(d + '/ours.npz')\n"
           "assert sorted(z.files) == ['ids', 'scalar', 'weights'], z.files\n"
           "assert (z['ids'] == i).all() and z['weights'].shape == (2, 3, 4)\n"
           "assert (z['weights'].ravel() == f).all() and z['scalar'] == f[1]\n"
           "assert zipfile.ZipFile(d + '/ours.npz').testzip() is None\n",
           d) != 0)
        FAIL("numpy could not read what we wrote");
}

static void test_ours_reads_numpy(void)
{
    struct moe_error err = {0};
    struct moe_npy a;
    char *p;
    static const struct {
        const char *file;
        int code;
        const char *msg;
    } refused[] = {
        {"compressed.npz", -EINVAL, "compressed .npz (np.savez_compressed) is not supported"},
        {"f8.npz", -EINVAL, "f8.npz:ids.npy': dtype '<f8'"},
        {"f8.npy", -EINVAL, "convert with x.astype(np.float32)"},
        {"be.npy", -EINVAL, "big-endian"},
        {"fortran.npy", -EINVAL, "np.ascontiguousarray"},
        {"f16.npy", -EINVAL, "dtype '<f2'"},
        {"i64.npy", -EINVAL, "dtype '<i8'"},
    };

    if (py("import numpy as np\n"
           "from numpy.lib import format as F\n"
           "d = '%s'\n"
           "f = np.arange(24, dtype=np.float32) * 0.25 - 3\n"
           "i = np.arange(6, dtype=np.int32) * 7 - 100\n"
           "np.save(d + '/np2d.npy', f.reshape(4, 6))\n"
           "np.save(d + '/np3d.npy', f.reshape(2, 3, 4))\n"
           "np.save(d + '/np0d.npy', np.float32(2.5))\n"
           "np.save(d + '/npi.npy', i)\n"
           "np.save(d + '/npf1.npy', np.asfortranarray(f))\n"
           "for v in (2, 3):\n"
           "    with open(d + '/npv%%d.npy' %% v, 'wb') as fh:\n"
           "        F.write_array(fh, f.reshape(6, 4), version=(v, 0))\n"
           "np.savez(d + '/np.npz', ids=i.reshape(3, 2), weights=f.reshape(4, 6))\n"
           "np.savez_compressed(d + '/compressed.npz', ids=i)\n"
           "np.save(d + '/f8.npy', f.astype(np.float64))\n"
           "np.savez(d + '/f8.npz', ids=f.astype(np.float64))\n"
           "np.save(d + '/be.npy', f.astype('>f4'))\n"
           "np.save(d + '/fortran.npy', np.asfortranarray(f.reshape(4, 6)))\n"
           "np.save(d + '/f16.npy', f.astype(np.float16))\n"
           "np.save(d + '/i64.npy', i.astype(np.int64))\n",
           tmp) != 0)
        FAIL("numpy could not write the test files");

    {
        static const struct {
            const char *file;
            enum moe_npy_type t;
            int ndim;
            int64_t shape[3];
        } ok[] = {
            {"np2d.npy", MOE_NPY_F32, 2, {4, 6}}, {"np3d.npy", MOE_NPY_F32, 3, {2, 3, 4}},
            {"npi.npy", MOE_NPY_I32, 1, {6}},     {"npf1.npy", MOE_NPY_F32, 1, {24}},
            {"npv2.npy", MOE_NPY_F32, 2, {6, 4}}, {"npv3.npy", MOE_NPY_F32, 2, {6, 4}},
        };

        for (size_t k = 0; k < MOE_ARRAY_SIZE(ok); k++) {
            p = tmp_path(ok[k].file);
            if (moe_npy_read(p, &a, &err) != 0)
                FAIL("%s: %s", ok[k].file, err.msg);
            check_values(&a, ok[k].t, ok[k].ndim, ok[k].shape);
            moe_npy_clear(&a);
            free(p);
        }
    }
    p = tmp_path("np0d.npy");
    ASSERT_EQ(moe_npy_read(p, &a, &err), 0);
    ASSERT_EQ(a.ndim, 0);
    ASSERT_EQ(a.count, 1);
    ASSERT_EQ(((float *)a.data)[0] == 2.5f, 1);
    moe_npy_clear(&a);
    free(p);

    /* numpy.savez: zip64 local headers, plain central directory. */
    p = tmp_path("np.npz");
    if (moe_npz_read_array(p, "ids", &a, &err) != 0)
        FAIL("np.npz ids: %s", err.msg);
    {
        int64_t s[2] = {3, 2};

        check_values(&a, MOE_NPY_I32, 2, s);
    }
    moe_npy_clear(&a);
    if (moe_npz_read_array(p, "weights", &a, &err) != 0)
        FAIL("np.npz weights: %s", err.msg);
    {
        int64_t s[2] = {4, 6};

        check_values(&a, MOE_NPY_F32, 2, s);
    }
    moe_npy_clear(&a);
    ASSERT_EQ(moe_npz_read_array(p, "x", &a, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "it holds: ids, weights");
    free(p);

    for (size_t k = 0; k < MOE_ARRAY_SIZE(refused); k++) {
        p = tmp_path(refused[k].file);
        if (strstr(refused[k].file, ".npz"))
            ASSERT_EQ(moe_npz_read_array(p, "ids", &a, &err), refused[k].code);
        else
            ASSERT_EQ(moe_npy_read(p, &a, &err), refused[k].code);
        ASSERT_CONTAINS(err.msg, refused[k].msg);
        ASSERT_CONTAINS(err.msg, refused[k].file);
        free(p);
    }
}

int main(void)
{
    tmp = test_tmpdir("npy");
    test_roundtrip();
    test_bad_npy();
    test_bad_npz();
    if (system(PYTHON " -c 'import numpy' 2>/dev/null") != 0) {
        fprintf(stderr, "numpy is missing (" PYTHON "): skipping the interoperability tests\n");
        test_rmtree(tmp);
        return TEST_SKIP;
    }
    test_numpy_reads_ours();
    test_ours_reads_numpy();
    test_rmtree(tmp);
    free(tmp);
    printf("test-npy: ok\n");
    return 0;
}
