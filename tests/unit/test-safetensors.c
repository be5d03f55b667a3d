/*
 * Tests of engine/safetensors.c: the header parser (good headers, then a
 * table of bad ones, each checked for its error code and message), reading
 * headers from files, the index parser and moe_read_file.
 */
#include "safetensors.h"
#include "tests.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

/* Writes len bytes to dir/name; returns the path (caller frees). */
static char *write_file(const char *dir, const char *name, const void *data, size_t len)
{
    char *path;
    FILE *f;

    if (asprintf(&path, "%s/%s", dir, name) < 0)
        FAIL("asprintf");
    f = fopen(path, "wb");
    if (!f)
        FAIL("cannot create %s", path);
    if (len && fwrite(data, 1, len, f) != len)
        FAIL("cannot write %s", path);
    fclose(f);
    return path;
}

/* A file image: 8-byte LE length of json, json, then data_len bytes. */
static uint8_t *st_image(const char *json, size_t data_len, size_t *ret_len)
{
    size_t n = strlen(json), len = 8 + n + data_len;
    uint8_t *p = malloc(len);

    if (!p)
        FAIL("malloc");
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)((uint64_t)n >> (8 * i));
    memcpy(p + 8, json, n);
    for (size_t i = 0; i < data_len; i++)
        p[8 + n + i] = (uint8_t)i;
    *ret_len = len;
    return p;
}

static void test_good_header(void)
{
    const char *json = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"b.weight\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]},"
                       "\"a.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]},"
                       "\"c.scalar\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[20,28]},"
                       "\"d.empty\":{\"dtype\":\"F16\",\"shape\":[0,4],\"data_offsets\":[28,28]},"
                       "\"e.bytes\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[28,31]}}  ";
    size_t n = strlen(json), fsize = 8 + n + 31;
    struct moe_st_header *h = NULL;
    struct moe_error err = {0};
    const struct moe_st_tensor *t;

    ASSERT_EQ(moe_st_header_parse(json, n, fsize, "x.safetensors", &h, &err), 0);
    ASSERT_EQ(h->header_len, n);
    ASSERT_EQ(h->data_start, 8 + n);
    ASSERT_EQ(h->file_size, fsize);
    ASSERT_EQ(h->n_tensors, 5);
    /* Sorted by name. */
    ASSERT_STREQ(h->tensors[0].name, "a.bias");
    ASSERT_STREQ(h->tensors[1].name, "b.weight");
    ASSERT_STREQ(h->tensors[2].name, "c.scalar");
    ASSERT_STREQ(h->tensors[3].name, "d.empty");
    ASSERT_STREQ(h->tensors[4].name, "e.bytes");

    t = moe_st_header_find(h, "b.weight");
    ASSERT_TRUE(t);
    ASSERT_EQ(t->dtype, MOE_DTYPE_BF16);
    ASSERT_EQ(t->ndim, 2);
    ASSERT_EQ(t->shape[0], 2);
    ASSERT_EQ(t->shape[1], 3);
    ASSERT_EQ(t->offset, 8 + n);
    ASSERT_EQ(t->nbytes, 12);
    t = moe_st_header_find(h, "a.bias");
    ASSERT_EQ(t->dtype, MOE_DTYPE_F32);
    ASSERT_EQ(t->offset, 8 + n + 12);
    ASSERT_EQ(t->nbytes, 8);
    t = moe_st_header_find(h, "c.scalar");
    ASSERT_EQ(t->ndim, 0);
    ASSERT_EQ(t->nbytes, 8);
    t = moe_st_header_find(h, "d.empty");
    ASSERT_EQ(t->nbytes, 0);
    ASSERT_EQ(t->offset, 8 + n + 28);
    ASSERT_TRUE(moe_st_header_find(h, "e.bytes"));
    ASSERT_TRUE(!moe_st_header_find(h, "zzz"));
    ASSERT_TRUE(!moe_st_header_find(h, "a"));
    ASSERT_TRUE(!moe_st_header_find(h, "__metadata__"));
    moe_st_header_free(h);

    /* No tensors at all, no data: fine. */
    ASSERT_EQ(moe_st_header_parse("{}", 2, 10, "e.safetensors", &h, &err), 0);
    ASSERT_EQ(h->n_tensors, 0);
    moe_st_header_free(h);
    moe_st_header_free(NULL);
}

struct bad_header {
    const char *what;
    const char *json;
    size_t data_len;
    const char *needle;
    const char *needle2;
};

static const struct bad_header bad_headers[] = {
    {"bad JSON", "{\"a\": ", 0, "x.safetensors: header is not valid JSON", "line 1"},
    {"not an object", "[1, 2]", 0, "header is an array, expected a JSON object", NULL},
    {"duplicate key",
     "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
     "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
     2, "duplicate", NULL},
    {"metadata not an object", "{\"__metadata__\": [1]}", 0, "__metadata__ is an array", NULL},
    {"metadata value not a string", "{\"__metadata__\": {\"format\": 1}}", 0,
     "__metadata__ 'format' is an integer", NULL},
    {"tensor not an object", "{\"t\": 5}", 0, "tensor 't' is an integer", NULL},
    {"no dtype", "{\"t\": {\"shape\": [1], \"data_offsets\": [0, 1]}}", 1, "tensor 't': no dtype",
     NULL},
    {"dtype not a string", "{\"t\": {\"dtype\": 3, \"shape\": [1], \"data_offsets\": [0, 1]}}", 1,
     "tensor 't': dtype is an integer", NULL},
    {"unknown dtype", "{\"t\": {\"dtype\": \"F4\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1,
     "tensor 't': unknown dtype \"F4\"", "BF16"},
    {"no shape", "{\"t\": {\"dtype\": \"U8\", \"data_offsets\": [0, 1]}}", 1,
     "tensor 't': no shape", NULL},
    {"shape not an array", "{\"t\": {\"dtype\": \"U8\", \"shape\": 4, \"data_offsets\": [0, 4]}}",
     4, "tensor 't': shape is an integer", NULL},
    {"negative dimension",
     "{\"t\": {\"dtype\": \"U8\", \"shape\": [2, -3], \"data_offsets\": [0, 6]}}", 6,
     "tensor 't': shape [2,-3]: dimension 1 is -3, expected a non-negative integer", NULL},
    {"real dimension", "{\"t\": {\"dtype\": \"U8\", \"shape\": [2.5], \"data_offsets\": [0, 2]}}",
     2, "dimension 0 is 2.5", NULL},
    {"too many dimensions",
     "{\"t\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 1]}}", 1,
     "shape has 9 dimensions, at most 8", NULL},
    {"element count overflow",
     "{\"t\": {\"dtype\": \"U8\", \"shape\": [4294967296, 4294967296, 2], "
     "\"data_offsets\": [0, 1]}}",
     1, "more than 2^64 elements", NULL},
    {"byte count overflow",
     "{\"t\": {\"dtype\": \"F32\", \"shape\": [4294967296, 1073741824], "
     "\"data_offsets\": [0, 1]}}",
     1, "dtype F32 x shape [4294967296, 1073741824] is more than 2^64 bytes", NULL},
    {"no data_offsets", "{\"t\": {\"dtype\": \"U8\", \"shape\": [1]}}", 1,
     "tensor 't': no data_offsets", NULL},
    {"data_offsets one number",
     "{\"t\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0]}}", 1,
     "data_offsets is [0], expected [begin, end]", NULL},
    {"data_offsets negative",
     "{\"t\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [-1, 0]}}", 1,
     "data_offsets is [-1,0]", NULL},
    {"data_offsets strings",
     "{\"t\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [\"0\", \"1\"]}}", 1,
     "expected [begin, end], two non-negative integers", NULL},
    {"begin after end", "{\"t\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [4, 2]}}", 4,
     "data_offsets [4, 2): begin is after end", NULL},
    {"wrong byte count",
     "{\"t\": {\"dtype\": \"BF16\", \"shape\": [8, 16], \"data_offsets\": [0, 100]}}", 100,
     "tensor 't': data_offsets [0, 100) hold 100 bytes but dtype BF16 x shape [8, 16] needs 256",
     NULL},
    {"range past the end",
     "{\"t\": {\"dtype\": \"U8\", \"shape\": [16], \"data_offsets\": [0, 16]}}", 10,
     "tensor 't': data_offsets [0, 16): byte range [", "runs past the end of the file"},
    {"overlap",
     "{\"a\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [0, 8]},"
     " \"b\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [4, 12]}}",
     12, "tensor 'a' data_offsets [0, 8) and tensor 'b' data_offsets [4, 12) overlap", NULL},
    {"same range twice",
     "{\"a\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [0, 8]},"
     " \"b\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [0, 8]}}",
     8, "overlap", "'b'"},
    {"empty tensor inside another",
     "{\"a\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [0, 8]},"
     " \"z\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [4, 4]}}",
     8, "tensor 'a' data_offsets [0, 8) and tensor 'z' data_offsets [4, 4) overlap", NULL},
    {"gap",
     "{\"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]},"
     " \"b\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [8, 12]}}",
     12, "gap: data bytes [4, 8) between tensor 'a' and tensor 'b' belong to no tensor", NULL},
    {"gap before the first tensor",
     "{\"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [4, 8]}}", 8,
     "gap: data bytes [0, 4) before tensor 'a'", NULL},
    {"trailing bytes", "{\"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]}}", 6,
     "trailing bytes: data bytes [4, 6) after the last tensor 'a'", NULL},
    {"data but no tensors", "{\"__metadata__\": {}}", 3, "trailing bytes: no tensors, but 3 bytes",
     NULL},
};

static void test_bad_headers(void)
{
    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad_headers); i++) {
        const struct bad_header *b = &bad_headers[i];
        size_t n = strlen(b->json);
        struct moe_st_header *h = (struct moe_st_header *)0x1;
        struct moe_error err = {0};
        int r;

        r = moe_st_header_parse(b->json, n, 8 + n + b->data_len, "x.safetensors", &h, &err);
        if (r != -EINVAL)
            FAIL("%s: expected -EINVAL, got %d (%s)", b->what, r, err.msg);
        ASSERT_EQ(err.code, -EINVAL);
        ASSERT_TRUE(h == (struct moe_st_header *)0x1);
        if (strncmp(err.msg, "x.safetensors: ", 15) != 0)
            FAIL("%s: message does not start with the file name: %s", b->what, err.msg);
        if (!strstr(err.msg, b->needle))
            FAIL("%s: \"%s\" does not contain \"%s\"", b->what, err.msg, b->needle);
        if (b->needle2 && !strstr(err.msg, b->needle2))
            FAIL("%s: \"%s\" does not contain \"%s\"", b->what, err.msg, b->needle2);
    }
}

/* The message of the brief, word for word. */
static void test_exact_message(void)
{
    const char *json = "{\"model.layers.3.mlp.experts.5.up_proj.weight\": {\"dtype\": \"BF16\", "
                       "\"shape\": [8, 16], \"data_offsets\": [0, 100]}}";
    struct moe_st_header *h;
    struct moe_error err;
    size_t n = strlen(json);

    ASSERT_EQ(
        moe_st_header_parse(json, n, 8 + n + 100, "model-00002-of-00003.safetensors", &h, &err),
        -EINVAL);
    ASSERT_STREQ(err.msg, "model-00002-of-00003.safetensors: tensor "
                          "'model.layers.3.mlp.experts.5.up_proj.weight': data_offsets [0, 100) "
                          "hold 100 bytes but dtype BF16 x shape [8, 16] needs 256");
}

static void test_header_len(void)
{
    struct moe_st_header *h;
    struct moe_error err;

    /* Longer than the file. */
    ASSERT_EQ(moe_st_header_parse("{}", 2, 9, "s.safetensors", &h, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "s.safetensors: header length 2 runs past the end of the file "
                             "(size 9)");
    /* Over the limit, whatever the file size. */
    ASSERT_EQ(moe_st_header_parse("{}", (size_t)MOE_ST_MAX_HEADER + 1, 1ull << 40, "s.safetensors",
                                  &h, &err),
              -EINVAL);
    ASSERT_CONTAINS(err.msg, "header length 104857601 is over the limit of 104857600 bytes");
    /* A file shorter than the prefix. */
    ASSERT_EQ(moe_st_header_parse("", 0, 4, "s.safetensors", &h, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "runs past the end of the file (size 4)");
}

static void test_header_read(void)
{
    const char *json = "{\"w\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[0,8]}}";
    char *dir = test_tmpdir("st"), *path, *p2;
    struct moe_st_header *h = NULL;
    struct moe_error err = {0};
    size_t len;
    uint8_t *img = st_image(json, 8, &len);
    int fd;

    path = write_file(dir, "good.safetensors", img, len);
    ASSERT_EQ(moe_st_header_read(path, "good.safetensors", &h, &err), 0);
    ASSERT_EQ(h->n_tensors, 1);
    ASSERT_EQ(h->file_size, len);
    ASSERT_EQ(h->tensors[0].offset, 8 + strlen(json));
    moe_st_header_free(h);
    /* fname NULL: the path names the file. */
    fd = open(path, O_RDONLY);
    ASSERT_TRUE(fd >= 0);
    ASSERT_EQ(moe_st_header_read_fd(fd, "g", &h, &err), 0);
    moe_st_header_free(h);
    close(fd);

    /* Truncated: the header length runs past the end. */
    p2 = write_file(dir, "trunc.safetensors", img, 8 + strlen(json) / 2);
    ASSERT_EQ(moe_st_header_read(p2, NULL, &h, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, p2);
    ASSERT_CONTAINS(err.msg, "runs past the end of the file");
    free(p2);
    /* Data cut short: the tensor runs past the end. */
    p2 = write_file(dir, "short.safetensors", img, len - 3);
    ASSERT_EQ(moe_st_header_read(p2, "short.safetensors", &h, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "short.safetensors: tensor 'w': data_offsets [0, 8): byte range");
    free(p2);
    /* Shorter than the length prefix. */
    p2 = write_file(dir, "tiny.safetensors", img, 5);
    ASSERT_EQ(moe_st_header_read(p2, "tiny.safetensors", &h, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "tiny.safetensors: file is 5 bytes, too short");
    free(p2);
    /* A huge length prefix. */
    img[5] = 0x10;
    p2 = write_file(dir, "huge.safetensors", img, len);
    ASSERT_EQ(moe_st_header_read(p2, "huge.safetensors", &h, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "huge.safetensors: header length");
    ASSERT_CONTAINS(err.msg, "is over the limit");
    free(p2);
    /* Missing, a directory. */
    ASSERT_EQ(moe_st_header_read("/nonexistent/x.safetensors", NULL, &h, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "/nonexistent/x.safetensors: cannot open: No such file");
    ASSERT_EQ(moe_st_header_read(dir, "dir", &h, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "dir: not a regular file");
    /* Unreadable (root reads anything: skip there). */
    if (geteuid() != 0) {
        ASSERT_EQ(chmod(path, 0), 0);
        ASSERT_EQ(moe_st_header_read(path, "good.safetensors", &h, &err), -EACCES);
        ASSERT_CONTAINS(err.msg, "good.safetensors: cannot open: Permission denied");
    }

    free(img);
    free(path);
    test_rmtree(dir);
    free(dir);
}

static void test_good_index(void)
{
    const char *json = "{\"metadata\": {\"total_size\": 123456789012},"
                       " \"weight_map\": {"
                       "\"z.weight\": \"model-00002-of-00002.safetensors\","
                       "\"a.weight\": \"model-00001-of-00002.safetensors\","
                       "\"m.weight\": \"model-00002-of-00002.safetensors\"},"
                       " \"extra\": true}";
    struct moe_st_index *idx = NULL;
    struct moe_error err = {0};

    ASSERT_EQ(moe_st_index_parse(json, strlen(json), "i.json", &idx, &err), 0);
    ASSERT_EQ(idx->total_size, 123456789012ull);
    ASSERT_EQ(idx->n_files, 2);
    ASSERT_STREQ(idx->files[0], "model-00001-of-00002.safetensors");
    ASSERT_STREQ(idx->files[1], "model-00002-of-00002.safetensors");
    ASSERT_EQ(idx->n_entries, 3);
    ASSERT_STREQ(idx->entries[0].tensor, "a.weight");
    ASSERT_EQ(idx->entries[0].file, 0);
    ASSERT_STREQ(idx->entries[1].tensor, "m.weight");
    ASSERT_EQ(idx->entries[1].file, 1);
    ASSERT_STREQ(idx->entries[2].tensor, "z.weight");
    ASSERT_EQ(idx->entries[2].file, 1);
    ASSERT_EQ(moe_st_index_find(idx, "a.weight"), 0);
    ASSERT_EQ(moe_st_index_find(idx, "z.weight"), 1);
    ASSERT_EQ(moe_st_index_find(idx, "b.weight"), -1);
    moe_st_index_free(idx);
    moe_st_index_free(NULL);

    /* No metadata, null total_size. */
    json = "{\"weight_map\": {\"a\": \"model.safetensors\"}, \"metadata\": {\"total_size\": null}}";
    ASSERT_EQ(moe_st_index_parse(json, strlen(json), "i.json", &idx, &err), 0);
    ASSERT_EQ(idx->total_size, 0);
    ASSERT_EQ(idx->n_files, 1);
    moe_st_index_free(idx);
}

struct bad_index {
    const char *json;
    const char *needle;
};

static const struct bad_index bad_indexes[] = {
    {"{\"weight_map\": ", "i.json: not valid JSON"},
    {"[]", "i.json: is an array, expected a JSON object with weight_map"},
    {"{\"metadata\": {\"total_size\": 1}}", "i.json: no weight_map"},
    {"{\"weight_map\": [\"a\"]}", "weight_map is an array"},
    {"{\"weight_map\": {}}", "weight_map is empty"},
    {"{\"weight_map\": {\"a\": 1}}", "tensor 'a' is mapped to an integer (1)"},
    {"{\"weight_map\": {\"a\": \"../x.safetensors\"}}",
     "tensor 'a' is mapped to '../x.safetensors', a path, not a plain file name"},
    {"{\"weight_map\": {\"a\": \"/etc/x.safetensors\"}}", "'/etc/x.safetensors', a path"},
    {"{\"weight_map\": {\"a\": \"sub/x.safetensors\"}}", "'sub/x.safetensors', a path"},
    {"{\"weight_map\": {\"a\": \"..\"}}", "'..', a directory"},
    {"{\"weight_map\": {\"a\": \".\"}}", "'.', a directory"},
    {"{\"weight_map\": {\"a\": \"\"}}", "'', an empty name"},
    {"{\"weight_map\": {\"a\": \"model.bin\"}}", "'model.bin', not a file name ending in"},
    {"{\"weight_map\": {\"a\": \".safetensors\"}}", "not a file name ending in .safetensors"},
    {"{\"weight_map\": {\"a\": \"x.safetensors\", \"a\": \"y.safetensors\"}}", "duplicate"},
    {"{\"metadata\": 3, \"weight_map\": {\"a\": \"x.safetensors\"}}",
     "metadata is an integer (3), expected an object"},
    {"{\"metadata\": {\"total_size\": -1}, \"weight_map\": {\"a\": \"x.safetensors\"}}",
     "metadata.total_size is -1, expected a non-negative integer"},
    {"{\"metadata\": {\"total_size\": \"big\"}, \"weight_map\": {\"a\": \"x.safetensors\"}}",
     "metadata.total_size is \"big\""},
};

static void test_bad_indexes(void)
{
    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad_indexes); i++) {
        const struct bad_index *b = &bad_indexes[i];
        struct moe_st_index *idx = NULL;
        struct moe_error err = {0};
        int r = moe_st_index_parse(b->json, strlen(b->json), "i.json", &idx, &err);

        if (r != -EINVAL)
            FAIL("index %s: expected -EINVAL, got %d (%s)", b->json, r, err.msg);
        ASSERT_TRUE(!idx);
        if (!strstr(err.msg, b->needle))
            FAIL("index %s: \"%s\" does not contain \"%s\"", b->json, err.msg, b->needle);
    }
}

static void test_index_read(void)
{
    const char *json = "{\"weight_map\": {\"a\": \"model-00001-of-00001.safetensors\"}}";
    char *dir = test_tmpdir("st-idx"), *path;
    struct moe_st_index *idx;
    struct moe_error err;

    path = write_file(dir, "model.safetensors.index.json", json, strlen(json));
    ASSERT_EQ(moe_st_index_read(path, NULL, &idx, &err), 0);
    ASSERT_EQ(idx->n_entries, 1);
    moe_st_index_free(idx);
    free(path);
    path = write_file(dir, "bad.json", "{\"weight_map\": {\"a\": \"../a.safetensors\"}}", 41);
    ASSERT_EQ(moe_st_index_read(path, "bad.json", &idx, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "bad.json: weight_map: tensor 'a' is mapped to '../a.safetensors'");
    free(path);
    ASSERT_EQ(moe_st_index_read("/nonexistent/i.json", NULL, &idx, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "/nonexistent/i.json");
    test_rmtree(dir);
    free(dir);
}

static void test_read_file(void)
{
    char *dir = test_tmpdir("st-rf"), *path, *buf;
    struct moe_error err;
    size_t len;

    path = write_file(dir, "f.json", "hello", 5);
    ASSERT_EQ(moe_read_file(path, 100, &buf, &len, &err), 0);
    ASSERT_EQ(len, 5);
    ASSERT_STREQ(buf, "hello");
    free(buf);
    /* Exactly at the limit, then one byte over. */
    ASSERT_EQ(moe_read_file(path, 5, &buf, &len, &err), 0);
    free(buf);
    ASSERT_EQ(moe_read_file(path, 4, &buf, &len, &err), -EFBIG);
    ASSERT_CONTAINS(err.msg, "f.json: file is 5 bytes, over the limit of 4");
    free(path);
    path = write_file(dir, "empty.json", "", 0);
    ASSERT_EQ(moe_read_file(path, 100, &buf, &len, &err), 0);
    ASSERT_EQ(len, 0);
    ASSERT_EQ(buf[0], 0);
    free(buf);
    free(path);
    ASSERT_EQ(moe_read_file(dir, 100, &buf, &len, &err), -EISDIR);
    ASSERT_CONTAINS(err.msg, "is a directory");
    ASSERT_EQ(moe_read_file("/nonexistent/config.json", 100, &buf, &len, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "/nonexistent/config.json: cannot open: No such file or directory");
    /* Not a regular file: read to the end, limit still applies. */
    ASSERT_EQ(moe_read_file("/dev/zero", 10000, &buf, &len, &err), -EFBIG);
    test_rmtree(dir);
    free(dir);
}

int main(void)
{
    test_good_header();
    test_bad_headers();
    test_exact_message();
    test_header_len();
    test_header_read();
    test_good_index();
    test_bad_indexes();
    test_index_read();
    test_read_file();
    printf("test-safetensors: ok\n");
    return 0;
}
