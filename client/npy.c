/*
 * NumPy .npy arrays and .npz archives: owns the parsing of the .npy header
 * dictionary, the .npy and .npz writers, the zip reader for .npz and CRC-32.
 *
 * Everything read is untrusted: every length and offset is checked against
 * the bytes actually there with overflow-checked arithmetic before use, and
 * every refusal says what was found and, where there is one, the fix.
 *
 * .npy: "\x93NUMPY", major, minor, header length (u16 LE in 1.0, u32 LE in
 * 2.0 and 3.0), then a Python dict literal {'descr': '<f4', 'fortran_order':
 * False, 'shape': (3, 4), } padded with spaces and a newline, then the data.
 * .npz: a zip archive (numpy.savez: stored entries "NAME.npy"; numpy marks
 * the local headers zip64 while the central directory has the real sizes).
 * The CRC-32 tables are built once, under pthread_once.
 */
#include "npy.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NPY_MAGIC "\x93NUMPY"
#define NPY_MAGIC_LEN 6
#define NPY_MAX_HEADER (1u << 20) /* numpy itself refuses over 10000 bytes */
#define NPY_ALIGN 64
#define NPY_ELEM_SIZE 4 /* both supported types */

/* ---- CRC-32 (IEEE 802.3, as zip), slicing by 8 ---------------------------- */

static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;

        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

/* Continues a CRC: start with crc32_update(0, ...), feed the result back in. */
static uint32_t crc32_update(uint32_t crc, const void *data, size_t len)
{
    const unsigned char *p = data;

    pthread_once(&crc_once, crc_init);
    crc = ~crc;
    while (len >= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                             (uint32_t)p[3] << 24);
        uint32_t hi =
            (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;

        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
              crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^
              crc_table[2][(hi >> 8) & 0xff] ^ crc_table[1][(hi >> 16) & 0xff] ^
              crc_table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* ---- little-endian fields ------------------------------------------------- */

static uint16_t rd16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const unsigned char *p)
{
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

static void wr16(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void wr32(unsigned char *p, uint32_t v)
{
    wr16(p, v & 0xffff);
    wr16(p + 2, v >> 16);
}

/* ---- .npy header ---------------------------------------------------------- */

struct npy_header {
    enum moe_npy_type type;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    size_t count;    /* elements */
    size_t nbytes;   /* data bytes */
    size_t data_off; /* offset of the data in the image */
};

static const char *type_descr(enum moe_npy_type t)
{
    return t == MOE_NPY_I32 ? "<i4" : "<f4";
}

/* A printable excerpt of s (at most n bytes) for messages. */
static void excerpt(const char *s, size_t n, char *out, size_t outlen)
{
    size_t o = 0;

    for (size_t i = 0; i < n && o + 5 < outlen; i++) {
        unsigned char c = (unsigned char)s[i];

        if (i == 24) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        if (c >= 0x20 && c < 0x7f) {
            out[o++] = (char)c;
        } else {
            snprintf(out + o, outlen - o, "\\x%02x", c);
            o += 4;
        }
    }
    out[o] = 0;
}

/* Cursor over the dictionary text. */
struct dict_cur {
    const char *p, *end, *start;
    const char *name;
    struct moe_error *err;
};

static void skip_ws(struct dict_cur *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int dict_error(struct dict_cur *c, const char *what)
{
    char ex[128];

    excerpt(c->p, (size_t)(c->end - c->p), ex, sizeof(ex));
    return moe_error_set(c->err, -EINVAL,
                         "'%s': cannot parse the .npy header dictionary at offset %zu: %s, "
                         "found '%s'",
                         c->name, (size_t)(c->p - c->start), what, ex);
}

/* A quoted string (' or ") without escapes, into buf. */
static int parse_str(struct dict_cur *c, char *buf, size_t len)
{
    char q;
    size_t n = 0;

    if (c->p >= c->end || (*c->p != '\'' && *c->p != '"'))
        return dict_error(c, "expected a quoted string");
    q = *c->p++;
    while (c->p < c->end && *c->p != q) {
        if (*c->p == '\\' || *c->p == '\n')
            return dict_error(c, "unsupported character in a string");
        if (n + 1 >= len)
            return dict_error(c, "string too long");
        buf[n++] = *c->p++;
    }
    if (c->p >= c->end)
        return dict_error(c, "unterminated string");
    c->p++;
    buf[n] = 0;
    return 0;
}

static bool eat(struct dict_cur *c, const char *word)
{
    size_t n = strlen(word);

    if ((size_t)(c->end - c->p) >= n && memcmp(c->p, word, n) == 0) {
        c->p += n;
        return true;
    }
    return false;
}

/* A tuple of non-negative integers: (), (5,), (3, 4), (3, 4,). */
static int parse_shape(struct dict_cur *c, struct npy_header *h)
{
    const char *open = c->p;

    if (!eat(c, "("))
        return dict_error(c, "expected the shape tuple '('");
    h->ndim = 0;
    for (;;) {
        int64_t v = 0;
        bool neg = false, digits = false;

        skip_ws(c);
        if (eat(c, ")"))
            break;
        if (c->p < c->end && *c->p == '-') {
            neg = true;
            c->p++;
        }
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
            if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, *c->p - '0', &v))
                return dict_error(c, "dimension overflows 64 bits");
            digits = true;
            c->p++;
        }
        if (!digits)
            return dict_error(c, "expected a dimension");
        if (neg)
            return moe_error_set(c->err, -EINVAL, "'%s': negative dimension -%lld in the shape",
                                 c->name, (long long)v);
        if (c->p < c->end && *c->p == 'L') /* Python 2 longs */
            c->p++;
        if (h->ndim == MOE_MAX_DIMS)
            return moe_error_set(c->err, -EINVAL, "'%s': more than %d dimensions", c->name,
                                 MOE_MAX_DIMS);
        h->shape[h->ndim++] = v;
        skip_ws(c);
        if (eat(c, ","))
            continue;
        if (eat(c, ")")) {
            if (h->ndim == 1) {
                /* "(5)" is the integer 5 in Python, not a tuple. */
                c->p = open;
                return dict_error(c, "shape is not a tuple (one dimension needs a comma)");
            }
            break;
        }
        return dict_error(c, "expected ',' or ')' in the shape");
    }
    return 0;
}

/* Parses the dictionary text (n bytes) into h. */
static int parse_dict(const char *text, size_t n, const char *name, struct npy_header *h,
                      struct moe_error *err)
{
    struct dict_cur c = {.p = text, .end = text + n, .start = text, .name = name, .err = err};
    bool have_descr = false, have_fortran = false, have_shape = false, fortran = false;
    char descr[64] = "";
    int r;

    skip_ws(&c);
    if (!eat(&c, "{"))
        return dict_error(&c, "expected '{'");
    for (;;) {
        char key[32];

        skip_ws(&c);
        if (eat(&c, "}"))
            break;
        r = parse_str(&c, key, sizeof(key));
        if (r < 0)
            return r;
        skip_ws(&c);
        if (!eat(&c, ":"))
            return dict_error(&c, "expected ':'");
        skip_ws(&c);
        if (strcmp(key, "descr") == 0 && !have_descr) {
            if (c.p < c.end && *c.p == '[')
                return moe_error_set(err, -EINVAL,
                                     "'%s': structured dtype: expected float32 ('<f4') or "
                                     "int32 ('<i4')",
                                     name);
            r = parse_str(&c, descr, sizeof(descr));
            if (r < 0)
                return r;
            have_descr = true;
        } else if (strcmp(key, "fortran_order") == 0 && !have_fortran) {
            if (eat(&c, "True"))
                fortran = true;
            else if (!eat(&c, "False"))
                return dict_error(&c, "expected True or False for 'fortran_order'");
            have_fortran = true;
        } else if (strcmp(key, "shape") == 0 && !have_shape) {
            r = parse_shape(&c, h);
            if (r < 0)
                return r;
            have_shape = true;
        } else if (strcmp(key, "descr") == 0 || strcmp(key, "fortran_order") == 0 ||
                   strcmp(key, "shape") == 0) {
            return moe_error_set(err, -EINVAL, "'%s': key '%s' appears twice in the header", name,
                                 key);
        } else {
            return moe_error_set(err, -EINVAL,
                                 "'%s': unexpected key '%s' in the header (expected 'descr', "
                                 "'fortran_order', 'shape')",
                                 name, key);
        }
        skip_ws(&c);
        if (eat(&c, ","))
            continue;
        if (eat(&c, "}"))
            break;
        return dict_error(&c, "expected ',' or '}'");
    }
    skip_ws(&c);
    if (c.p != c.end)
        return dict_error(&c, "unexpected text after the dictionary");
    if (!have_descr || !have_fortran || !have_shape)
        return moe_error_set(err, -EINVAL, "'%s': header lacks '%s'", name,
                             !have_descr     ? "descr"
                             : !have_fortran ? "fortran_order"
                                             : "shape");

    if (strcmp(descr, "<f4") == 0) {
        h->type = MOE_NPY_F32;
    } else if (strcmp(descr, "<i4") == 0) {
        h->type = MOE_NPY_I32;
    } else if (strcmp(descr, ">f4") == 0 || strcmp(descr, ">i4") == 0) {
        return moe_error_set(err, -EINVAL,
                             "'%s': big-endian dtype '%s': convert with x.astype('<%s')", name,
                             descr, descr + 1);
    } else {
        return moe_error_set(err, -EINVAL,
                             "'%s': dtype '%s': expected float32 ('<f4') or int32 ('<i4'): "
                             "convert with x.astype(np.float32)",
                             name, descr);
    }
    if (fortran) {
        int big = 0;

        /* Only a problem when the orders differ: two dimensions over 1. */
        for (int i = 0; i < h->ndim; i++)
            big += h->shape[i] > 1;
        if (big > 1)
            return moe_error_set(err, -EINVAL,
                                 "'%s': array is in Fortran order: save "
                                 "np.ascontiguousarray(x) instead",
                                 name);
    }
    return 0;
}

/*
 * Checks the magic, version and header length of a .npy image of total
 * bytes (the first avail of which are in buf, avail >= 12 or all of them):
 * sets *ret_data_off to where the data starts (after the header).
 */
static int parse_prefix(const unsigned char *buf, size_t avail, uint64_t total, const char *name,
                        size_t *ret_pre, size_t *ret_data_off, struct moe_error *err)
{
    size_t pre, hlen;

    if (total < 8 || avail < 8 || memcmp(buf, NPY_MAGIC, NPY_MAGIC_LEN) != 0)
        return moe_error_set(err, -EINVAL, "'%s': not a .npy file (bad magic)", name);
    if (buf[6] == 1 && buf[7] == 0) {
        pre = 10;
    } else if ((buf[6] == 2 || buf[6] == 3) && buf[7] == 0) {
        pre = 12;
    } else {
        return moe_error_set(err, -EINVAL,
                             "'%s': unsupported .npy version %u.%u (expected 1.0, 2.0 or 3.0)",
                             name, buf[6], buf[7]);
    }
    if (total < pre || avail < pre)
        return moe_error_set(err, -EINVAL, "'%s': truncated .npy header", name);
    hlen = pre == 10 ? rd16(buf + 8) : rd32(buf + 8);
    if (hlen > NPY_MAX_HEADER)
        return moe_error_set(err, -EINVAL, "'%s': .npy header of %zu bytes (at most %u)", name,
                             hlen, NPY_MAX_HEADER);
    if (pre + hlen > total)
        return moe_error_set(err, -EINVAL,
                             "'%s': .npy header of %zu bytes runs past the end of the file "
                             "(%llu bytes)",
                             name, hlen, (unsigned long long)total);
    *ret_pre = pre;
    *ret_data_off = pre + hlen;
    return 0;
}

/*
 * Parses the prefix and dictionary of a .npy image of total bytes, the
 * header of which (at least) is in buf (avail bytes), and checks the data
 * that follows is exactly what the shape needs.
 */
static int parse_header(const unsigned char *buf, size_t avail, uint64_t total, const char *name,
                        struct npy_header *h, struct moe_error *err)
{
    size_t pre, data_off, count = 1, nbytes;
    int r;

    memset(h, 0, sizeof(*h));
    r = parse_prefix(buf, avail, total, name, &pre, &data_off, err);
    if (r < 0)
        return r;
    if (data_off > avail)
        return moe_error_set(err, -EIO, "'%s': header not read", name);
    r = parse_dict((const char *)buf + pre, data_off - pre, name, h, err);
    if (r < 0)
        return r;
    for (int i = 0; i < h->ndim; i++) {
        if ((uint64_t)h->shape[i] > SIZE_MAX || !moe_mul_size(count, (size_t)h->shape[i], &count))
            return moe_error_set(err, -EINVAL, "'%s': shape overflows the address space", name);
    }
    if (!moe_mul_size(count, NPY_ELEM_SIZE, &nbytes))
        return moe_error_set(err, -EINVAL, "'%s': shape overflows the address space", name);
    h->count = count;
    h->nbytes = nbytes;
    h->data_off = data_off;
    if (total - h->data_off != nbytes) {
        char shape[160];
        size_t o = 0;

        o += (size_t)snprintf(shape, sizeof(shape), "(");
        for (int i = 0; i < h->ndim && o < sizeof(shape) - 24; i++)
            o += (size_t)snprintf(shape + o, sizeof(shape) - o, "%s%lld", i ? ", " : "",
                                  (long long)h->shape[i]);
        snprintf(shape + o, sizeof(shape) - o, "%s)", h->ndim == 1 ? "," : "");
        return moe_error_set(
            err, -EINVAL, "'%s': data is %llu bytes but shape %s of %s needs %zu: file %s", name,
            (unsigned long long)(total - h->data_off), shape, type_descr(h->type), nbytes,
            total - h->data_off < nbytes ? "truncated" : "has trailing bytes");
    }
    return 0;
}

static int npy_alloc(const struct npy_header *h, struct moe_npy *ret, struct moe_error *err)
{
    memset(ret, 0, sizeof(*ret));
    ret->data = moe_alloc_aligned(h->nbytes ? h->nbytes : 1);
    if (!ret->data)
        return moe_error_set(err, -ENOMEM, "out of memory for %zu bytes", h->nbytes);
    ret->type = h->type;
    ret->ndim = h->ndim;
    memcpy(ret->shape, h->shape, sizeof(ret->shape));
    ret->count = h->count;
    return 0;
}

int moe_npy_parse(const void *buf, size_t len, const char *name, struct moe_npy *ret,
                  struct moe_error *err)
{
    struct npy_header h;
    int r;

    if (!name)
        name = "(buffer)";
    r = parse_header(buf, len, len, name, &h, err);
    if (r < 0)
        return r;
    r = npy_alloc(&h, ret, err);
    if (r < 0)
        return r;
    memcpy(ret->data, (const unsigned char *)buf + h.data_off, h.nbytes);
    return 0;
}

/* pread until done; -EIO for a short file. */
static int pread_all(int fd, void *buf, size_t len, uint64_t off)
{
    int64_t n = moe_pread_full(fd, buf, len, off);

    if (n < 0)
        return (int)n;
    return (size_t)n == len ? 0 : -EIO;
}

static int open_regular(const char *path, uint64_t *ret_size, struct moe_error *err)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC), r;

    if (fd < 0) {
        r = -errno;
        return moe_error_set(err, r, "cannot open '%s': %s", path, strerror(-r));
    }
    if (fstat(fd, &st) < 0) {
        r = -errno;
        close(fd);
        return moe_error_set(err, r, "cannot stat '%s': %s", path, strerror(-r));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return moe_error_set(err, -EINVAL, "'%s' is not a regular file", path);
    }
    *ret_size = (uint64_t)st.st_size;
    return fd;
}

int moe_npy_read(const char *path, struct moe_npy *ret, struct moe_error *err)
{
    unsigned char pre[12], *hdr = NULL;
    struct npy_header h;
    uint64_t size;
    size_t avail, plen, data_off;
    int fd, r;

    fd = open_regular(path, &size, err);
    if (fd < 0)
        return fd;
    /* Magic, version and header length first, to know how much to read. */
    avail = (size_t)MOE_MIN(size, (uint64_t)sizeof(pre));
    r = pread_all(fd, pre, avail, 0);
    if (r < 0)
        goto out_io;
    r = parse_prefix(pre, avail, size, path, &plen, &data_off, err);
    if (r < 0)
        goto out;
    hdr = malloc(data_off);
    if (!hdr) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    r = pread_all(fd, hdr, data_off, 0);
    if (r < 0)
        goto out_io;
    r = parse_header(hdr, data_off, size, path, &h, err);
    if (r < 0)
        goto out;
    r = npy_alloc(&h, ret, err);
    if (r < 0)
        goto out;
    r = pread_all(fd, ret->data, h.nbytes, h.data_off);
    if (r < 0) {
        moe_npy_clear(ret);
        goto out_io;
    }
    goto out;
out_io:
    moe_error_set(err, r, "reading '%s': %s", path, strerror(-r));
out:
    free(hdr);
    close(fd);
    return r;
}

void moe_npy_clear(struct moe_npy *a)
{
    if (!a)
        return;
    moe_free_aligned(a->data);
    memset(a, 0, sizeof(*a));
}

/*
 * Builds the v1.0 prefix and header of an array (padded so that the data
 * starts on a 64-byte boundary) into buf (at least 256 bytes); returns its
 * length and sets *ret_nbytes, or -errno.
 */
static int build_header(enum moe_npy_type type, int ndim, const int64_t *shape, char *buf,
                        size_t len, size_t *ret_nbytes, struct moe_error *err)
{
    size_t o, count = 1;
    int n;

    if (type != MOE_NPY_F32 && type != MOE_NPY_I32)
        return moe_error_set(err, -EINVAL, "unknown array type %d", (int)type);
    if (ndim < 0 || ndim > MOE_MAX_DIMS || (ndim > 0 && !shape))
        return moe_error_set(err, -EINVAL, "%d dimensions: expected 0 to %d", ndim, MOE_MAX_DIMS);
    memcpy(buf, NPY_MAGIC "\x01\x00", 8);
    o = 10;
    n = snprintf(buf + o, len - o, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                 type_descr(type));
    o += (size_t)n;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (uint64_t)shape[i] > SIZE_MAX ||
            !moe_mul_size(count, (size_t)shape[i], &count))
            return moe_error_set(err, -EINVAL, "bad dimension %d: %lld", i, (long long)shape[i]);
        n = snprintf(buf + o, len - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
        o += (size_t)n;
    }
    n = snprintf(buf + o, len - o, "%s), }", ndim == 1 ? "," : "");
    o += (size_t)n;
    if (!moe_mul_size(count, NPY_ELEM_SIZE, ret_nbytes))
        return moe_error_set(err, -EINVAL, "array too large");
    /* Spaces, then '\n' as the last byte before the 64-byte boundary. */
    while ((o + 1) % NPY_ALIGN != 0)
        buf[o++] = ' ';
    buf[o++] = '\n';
    wr16((unsigned char *)buf + 8, (uint32_t)(o - 10));
    return (int)o;
}

/* fwrite that sets the message and returns -errno on failure. */
static int fwrite_all(FILE *f, const void *p, size_t n, const char *path, struct moe_error *err)
{
    int r;

    if (n && fwrite(p, 1, n, f) != n) {
        r = -(errno ? errno : EIO);
        return moe_error_set(err, r, "writing '%s': %s", path, strerror(-r));
    }
    return 0;
}

/* Closes f; on failure (r < 0, message set, or fclose failing) removes the file. */
static int finish_file(FILE *f, const char *path, int r, struct moe_error *err)
{
    if (fclose(f) != 0 && r == 0) {
        r = -(errno ? errno : EIO);
        moe_error_set(err, r, "writing '%s': %s", path, strerror(-r));
    }
    if (r < 0)
        unlink(path);
    return r;
}

int moe_npy_write(const char *path, enum moe_npy_type type, int ndim, const int64_t *shape,
                  const void *data, struct moe_error *err)
{
    char hdr[512];
    size_t nbytes;
    FILE *f;
    int hl, r;

    hl = build_header(type, ndim, shape, hdr, sizeof(hdr), &nbytes, err);
    if (hl < 0)
        return hl;
    if (nbytes && !data)
        return moe_error_set(err, -EINVAL, "no data for '%s'", path);
    f = fopen(path, "we");
    if (!f) {
        r = -errno;
        return moe_error_set(err, r, "cannot create '%s': %s", path, strerror(-r));
    }
    r = fwrite_all(f, hdr, (size_t)hl, path, err);
    if (r == 0)
        r = fwrite_all(f, data, nbytes, path, err);
    return finish_file(f, path, r, err);
}

/* ---- .npz ----------------------------------------------------------------- */

#define ZIP_LOCAL_SIG 0x04034b50u
#define ZIP_CENTRAL_SIG 0x02014b50u
#define ZIP_EOCD_SIG 0x06054b50u
#define ZIP64_EOCD_SIG 0x06064b50u
#define ZIP64_LOCATOR_SIG 0x07064b50u
#define ZIP_LOCAL_LEN 30
#define ZIP_CENTRAL_LEN 46
#define ZIP_EOCD_LEN 22
#define ZIP64_EOCD_LEN 56
#define ZIP64_LOCATOR_LEN 20
#define ZIP_VERSION 20      /* 2.0: stored entries */
#define ZIP_DOS_DATE 0x0021 /* 1980-01-01, so that archives are reproducible */
#define ZIP_MAX_ENTRY 0xffffffffu

struct npz_written {
    uint32_t crc, size, offset;
};

int moe_npz_write(const char *path, const struct moe_npz_entry *entries, int n,
                  struct moe_error *err)
{
    struct npz_written *w = NULL;
    unsigned char rec[ZIP_CENTRAL_LEN];
    uint64_t off = 0, cd_start;
    FILE *f = NULL;
    int r = 0;

    if (n < 0 || n > 0xffff || (n > 0 && !entries))
        return moe_error_set(err, -EINVAL, "'%s': %d arrays (0 to 65535)", path, n);
    for (int i = 0; i < n; i++) {
        size_t nl = entries[i].name ? strlen(entries[i].name) : 0;

        if (nl == 0 || nl > 0xffff - 4)
            return moe_error_set(err, -EINVAL, "'%s': array %d has %s name", path, i,
                                 nl ? "a too long" : "no");
        for (int j = 0; j < i; j++)
            if (strcmp(entries[i].name, entries[j].name) == 0)
                return moe_error_set(err, -EINVAL, "'%s': array name '%s' used twice", path,
                                     entries[i].name);
    }
    w = calloc((size_t)MOE_MAX(n, 1), sizeof(*w));
    if (!w)
        return moe_error_set(err, -ENOMEM, "out of memory");
    f = fopen(path, "we");
    if (!f) {
        r = -errno;
        moe_error_set(err, r, "cannot create '%s': %s", path, strerror(-r));
        free(w);
        return r;
    }
    for (int i = 0; i < n && r == 0; i++) {
        const struct moe_npz_entry *e = &entries[i];
        size_t nl = strlen(e->name), nbytes;
        char hdr[512];
        int hl = build_header(e->type, e->ndim, e->shape, hdr, sizeof(hdr), &nbytes, err);
        uint64_t size;
        uint32_t crc;

        if (hl < 0) {
            r = hl;
            break;
        }
        if (nbytes && !e->data) {
            r = moe_error_set(err, -EINVAL, "'%s': no data for array '%s'", path, e->name);
            break;
        }
        size = (uint64_t)hl + nbytes;
        if (size > ZIP_MAX_ENTRY || off > ZIP_MAX_ENTRY) {
            r = moe_error_set(err, -EFBIG,
                              "'%s': array '%s' makes the archive over 4 GiB (zip64 is not "
                              "written); save it as .npy",
                              path, e->name);
            break;
        }
        crc = crc32_update(0, hdr, (size_t)hl);
        crc = crc32_update(crc, e->data, nbytes);
        w[i] = (struct npz_written){.crc = crc, .size = (uint32_t)size, .offset = (uint32_t)off};
        memset(rec, 0, sizeof(rec));
        wr32(rec, ZIP_LOCAL_SIG);
        wr16(rec + 4, ZIP_VERSION);
        wr16(rec + 12, ZIP_DOS_DATE);
        wr32(rec + 14, crc);
        wr32(rec + 18, (uint32_t)size);
        wr32(rec + 22, (uint32_t)size);
        wr16(rec + 26, (uint32_t)(nl + 4));
        r = fwrite_all(f, rec, ZIP_LOCAL_LEN, path, err);
        if (r == 0)
            r = fwrite_all(f, e->name, nl, path, err);
        if (r == 0)
            r = fwrite_all(f, ".npy", 4, path, err);
        if (r == 0)
            r = fwrite_all(f, hdr, (size_t)hl, path, err);
        if (r == 0)
            r = fwrite_all(f, e->data, nbytes, path, err);
        off += ZIP_LOCAL_LEN + nl + 4 + size;
    }
    cd_start = off;
    for (int i = 0; i < n && r == 0; i++) {
        size_t nl = strlen(entries[i].name);

        memset(rec, 0, sizeof(rec));
        wr32(rec, ZIP_CENTRAL_SIG);
        wr16(rec + 4, 0x0300 | ZIP_VERSION); /* made by: Unix, 2.0 */
        wr16(rec + 6, ZIP_VERSION);
        wr16(rec + 14, ZIP_DOS_DATE);
        wr32(rec + 16, w[i].crc);
        wr32(rec + 20, w[i].size);
        wr32(rec + 24, w[i].size);
        wr16(rec + 28, (uint32_t)(nl + 4));
        wr32(rec + 38, 0100644u << 16); /* regular file, rw-r--r-- */
        wr32(rec + 42, w[i].offset);
        r = fwrite_all(f, rec, ZIP_CENTRAL_LEN, path, err);
        if (r == 0)
            r = fwrite_all(f, entries[i].name, nl, path, err);
        if (r == 0)
            r = fwrite_all(f, ".npy", 4, path, err);
        off += ZIP_CENTRAL_LEN + nl + 4;
    }
    if (r == 0 && (cd_start > ZIP_MAX_ENTRY || off - cd_start > ZIP_MAX_ENTRY))
        r = moe_error_set(err, -EFBIG, "'%s': archive over 4 GiB (zip64 is not written)", path);
    if (r == 0) {
        memset(rec, 0, sizeof(rec));
        wr32(rec, ZIP_EOCD_SIG);
        wr16(rec + 8, (uint32_t)n);
        wr16(rec + 10, (uint32_t)n);
        wr32(rec + 12, (uint32_t)(off - cd_start));
        wr32(rec + 16, (uint32_t)cd_start);
        r = fwrite_all(f, rec, ZIP_EOCD_LEN, path, err);
    }
    free(w);
    return finish_file(f, path, r, err);
}

/* One central directory entry, sizes resolved (zip64 extra fields applied). */
struct zip_entry {
    const unsigned char *name;
    size_t name_len;
    uint16_t flags, method;
    uint32_t crc;
    uint64_t csize, usize, local_off;
};

/* Applies a zip64 extended information extra field to the 0xffffffff fields. */
static int apply_zip64_extra(const unsigned char *x, size_t xlen, struct zip_entry *e, bool need_u,
                             bool need_c, bool need_o)
{
    while (xlen >= 4) {
        uint16_t id = rd16(x), sz = rd16(x + 2);
        const unsigned char *d = x + 4;
        size_t o = 0;

        if ((size_t)sz > xlen - 4)
            return -EINVAL;
        if (id == 0x0001) {
            if (need_u) {
                if (o + 8 > sz)
                    return -EINVAL;
                e->usize = rd64(d + o);
                o += 8;
            }
            if (need_c) {
                if (o + 8 > sz)
                    return -EINVAL;
                e->csize = rd64(d + o);
                o += 8;
            }
            if (need_o) {
                if (o + 8 > sz)
                    return -EINVAL;
                e->local_off = rd64(d + o);
            }
            return 0;
        }
        x += 4 + sz;
        xlen -= 4 + (size_t)sz;
    }
    return -EINVAL;
}

/* Appends an entry name (without ".npy", unprintable bytes as '?') to a list. */
static void list_name(char *list, size_t len, const unsigned char *name, size_t nl)
{
    size_t o = strlen(list);

    if (nl >= 4 && memcmp(name + nl - 4, ".npy", 4) == 0)
        nl -= 4;
    if (o && o + 2 < len) {
        memcpy(list + o, ", ", 2);
        o += 2;
    }
    for (size_t i = 0; i < nl && o + 4 < len; i++)
        list[o++] = (name[i] >= 0x20 && name[i] < 0x7f) ? (char)name[i] : '?';
    if (o + 4 >= len && o >= 3)
        memcpy(list + o - 3, "...", 3);
    list[o] = 0;
}

int moe_npz_parse_array(const void *buf, size_t len, const char *fname, const char *name,
                        struct moe_npy *ret, struct moe_error *err)
{
    const unsigned char *b = buf;
    const unsigned char *eocd = NULL, *p, *cd_end;
    uint64_t n_entries, cd_size, cd_off, data_off, end;
    size_t want = strlen(name), scan_end;
    char list[512] = "", *ename = NULL;
    struct zip_entry e = {0};
    bool found = false;
    int r;

    if (!fname)
        fname = "(buffer)";
    if (len < ZIP_EOCD_LEN)
        return moe_error_set(err, -EINVAL, "'%s': not an .npz (zip) archive: too short", fname);
    /* The end record is the last thing in the file, before a comment of at
     * most 65535 bytes. */
    scan_end = len - ZIP_EOCD_LEN;
    for (size_t i = 0; i <= MOE_MIN(scan_end, (size_t)0xffff); i++) {
        const unsigned char *q = b + scan_end - i;

        if (rd32(q) == ZIP_EOCD_SIG && (size_t)rd16(q + 20) <= i) {
            eocd = q;
            break;
        }
    }
    if (!eocd)
        return moe_error_set(err, -EINVAL,
                             "'%s': not an .npz (zip) archive: no end of central directory", fname);
    if (rd16(eocd + 4) != 0 || rd16(eocd + 6) != 0)
        return moe_error_set(err, -EINVAL, "'%s': multi-volume zip archives are not supported",
                             fname);
    n_entries = rd16(eocd + 10);
    cd_size = rd32(eocd + 12);
    cd_off = rd32(eocd + 16);
    if (n_entries == 0xffff || cd_size == 0xffffffffu || cd_off == 0xffffffffu) {
        /* zip64: the locator sits right before the end record. */
        const unsigned char *loc, *z;
        uint64_t zoff;

        if ((size_t)(eocd - b) < ZIP64_LOCATOR_LEN)
            return moe_error_set(err, -EINVAL, "'%s': zip64 archive without its locator", fname);
        loc = eocd - ZIP64_LOCATOR_LEN;
        if (rd32(loc) != ZIP64_LOCATOR_SIG)
            return moe_error_set(err, -EINVAL, "'%s': zip64 archive without its locator", fname);
        zoff = rd64(loc + 8);
        if (zoff > (uint64_t)(loc - b) || (uint64_t)(loc - b) - zoff < ZIP64_EOCD_LEN ||
            rd32(b + zoff) != ZIP64_EOCD_SIG)
            return moe_error_set(err, -EINVAL, "'%s': bad zip64 end of central directory", fname);
        z = b + zoff;
        n_entries = rd64(z + 32);
        cd_size = rd64(z + 40);
        cd_off = rd64(z + 48);
        eocd = z; /* the central directory ends before it */
    }
    if (cd_off > (uint64_t)(eocd - b) || cd_size > (uint64_t)(eocd - b) - cd_off)
        return moe_error_set(err, -EINVAL,
                             "'%s': central directory (offset %llu, %llu bytes) is outside "
                             "the file",
                             fname, (unsigned long long)cd_off, (unsigned long long)cd_size);
    p = b + cd_off;
    cd_end = p + cd_size;
    for (uint64_t i = 0; i < n_entries; i++) {
        struct zip_entry c = {0};
        uint16_t xlen, clen;

        if ((size_t)(cd_end - p) < ZIP_CENTRAL_LEN || rd32(p) != ZIP_CENTRAL_SIG)
            return moe_error_set(err, -EINVAL, "'%s': central directory entry %llu is corrupt",
                                 fname, (unsigned long long)i);
        c.flags = rd16(p + 8);
        c.method = rd16(p + 10);
        c.crc = rd32(p + 16);
        c.csize = rd32(p + 20);
        c.usize = rd32(p + 24);
        c.name_len = rd16(p + 28);
        xlen = rd16(p + 30);
        clen = rd16(p + 32);
        c.local_off = rd32(p + 42);
        c.name = p + ZIP_CENTRAL_LEN;
        if ((size_t)(cd_end - c.name) < c.name_len + (size_t)xlen + clen)
            return moe_error_set(err, -EINVAL, "'%s': central directory entry %llu is corrupt",
                                 fname, (unsigned long long)i);
        if (c.name_len == want + 4 && memcmp(c.name, name, want) == 0 &&
            memcmp(c.name + want, ".npy", 4) == 0) {
            bool nu = c.usize == 0xffffffffu, nc = c.csize == 0xffffffffu,
                 no = c.local_off == 0xffffffffu;

            if ((nu || nc || no) &&
                apply_zip64_extra(c.name + c.name_len, xlen, &c, nu, nc, no) < 0)
                return moe_error_set(err, -EINVAL, "'%s': bad zip64 sizes of '%s'", fname, name);
            e = c;
            found = true;
            break;
        }
        list_name(list, sizeof(list), c.name, c.name_len);
        p = c.name + c.name_len + xlen + clen;
    }
    if (!found) {
        return moe_error_set(err, -ENOENT, "'%s' has no array '%s' (%s%s)", fname, name,
                             *list ? "it holds: " : "it holds no arrays", list);
    }
    if (e.flags & 1)
        return moe_error_set(err, -EINVAL, "'%s': array '%s' is encrypted", fname, name);
    if (e.method == 8)
        return moe_error_set(err, -EINVAL,
                             "'%s': compressed .npz (np.savez_compressed) is not supported: "
                             "use np.savez",
                             fname);
    if (e.method != 0)
        return moe_error_set(err, -EINVAL,
                             "'%s': array '%s': zip compression method %u is not "
                             "supported: use np.savez",
                             fname, name, e.method);
    if (e.csize != e.usize)
        return moe_error_set(err, -EINVAL,
                             "'%s': array '%s': stored entry with %llu bytes "
                             "stored but %llu uncompressed",
                             fname, name, (unsigned long long)e.csize, (unsigned long long)e.usize);
    /* Local header: its own name and extra lengths place the data. */
    if (e.local_off > cd_off || cd_off - e.local_off < ZIP_LOCAL_LEN ||
        rd32(b + e.local_off) != ZIP_LOCAL_SIG)
        return moe_error_set(err, -EINVAL, "'%s': local header of '%s' is corrupt", fname, name);
    data_off =
        e.local_off + ZIP_LOCAL_LEN + rd16(b + e.local_off + 26) + rd16(b + e.local_off + 28);
    if (__builtin_add_overflow(data_off, e.usize, &end) || end > cd_off)
        return moe_error_set(err, -EINVAL,
                             "'%s': array '%s' (%llu bytes at %llu) runs past its place in "
                             "the archive",
                             fname, name, (unsigned long long)e.usize,
                             (unsigned long long)data_off);
    if (crc32_update(0, b + data_off, (size_t)e.usize) != e.crc)
        return moe_error_set(err, -EINVAL, "'%s': array '%s' fails its CRC-32 check (corrupt)",
                             fname, name);
    if (asprintf(&ename, "%s:%s.npy", fname, name) < 0)
        return moe_error_set(err, -ENOMEM, "out of memory");
    r = moe_npy_parse(b + data_off, (size_t)e.usize, ename, ret, err);
    free(ename);
    return r;
}

int moe_npz_read_array(const char *path, const char *name, struct moe_npy *ret,
                       struct moe_error *err)
{
    unsigned char *buf;
    uint64_t size;
    int fd, r;

    fd = open_regular(path, &size, err);
    if (fd < 0)
        return fd;
    if (size > SIZE_MAX / 2) {
        close(fd);
        return moe_error_set(err, -EFBIG, "'%s' is too large", path);
    }
    buf = malloc(size ? (size_t)size : 1);
    if (!buf) {
        close(fd);
        return moe_error_set(err, -ENOMEM, "out of memory reading '%s'", path);
    }
    r = pread_all(fd, buf, (size_t)size, 0);
    close(fd);
    if (r < 0)
        moe_error_set(err, r, "reading '%s': %s", path, strerror(-r));
    else
        r = moe_npz_parse_array(buf, (size_t)size, path, name, ret, err);
    free(buf);
    return r;
}
