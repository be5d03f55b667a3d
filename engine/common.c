/*
 * Error messages, dtype names and sizes, aligned allocation, the clock.
 */
#include "common.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

int moe_error_set(struct moe_error *err, int code, const char *fmt, ...)
{
    va_list ap;

    if (err) {
        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
    }
    return code;
}

void moe_error_prefix(struct moe_error *err, const char *fmt, ...)
{
    char old[MOE_ERROR_MSG_MAX];
    va_list ap;
    int n;

    if (!err)
        return;
    memcpy(old, err->msg, sizeof(old));
    va_start(ap, fmt);
    n = vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(err->msg) - 2)
        return;
    /* Append ": old", truncated to what fits. */
    err->msg[n] = ':';
    err->msg[n + 1] = ' ';
    memcpy(err->msg + n + 2, old, MOE_MIN(strlen(old) + 1, sizeof(err->msg) - (size_t)n - 2));
    err->msg[sizeof(err->msg) - 1] = 0;
}

static const struct {
    const char *name;
    const char *user;
    size_t size;
} dtypes[MOE_DTYPE_COUNT] = {
    [MOE_DTYPE_F32] = {"F32", "f32", 4},
    [MOE_DTYPE_F16] = {"F16", "f16", 2},
    [MOE_DTYPE_BF16] = {"BF16", "bf16", 2},
    [MOE_DTYPE_F64] = {"F64", "f64", 8},
    [MOE_DTYPE_F8_E4M3] = {"F8_E4M3", "f8_e4m3", 1},
    [MOE_DTYPE_F8_E5M2] = {"F8_E5M2", "f8_e5m2", 1},
    [MOE_DTYPE_BOOL] = {"BOOL", "bool", 1},
    [MOE_DTYPE_U8] = {"U8", "u8", 1},
    [MOE_DTYPE_I8] = {"I8", "i8", 1},
    [MOE_DTYPE_I16] = {"I16", "i16", 2},
    [MOE_DTYPE_U16] = {"U16", "u16", 2},
    [MOE_DTYPE_I32] = {"I32", "i32", 4},
    [MOE_DTYPE_U32] = {"U32", "u32", 4},
    [MOE_DTYPE_I64] = {"I64", "i64", 8},
    [MOE_DTYPE_U64] = {"U64", "u64", 8},
};

size_t moe_dtype_size(enum moe_dtype t)
{
    return (unsigned)t < MOE_DTYPE_COUNT ? dtypes[t].size : 0;
}

const char *moe_dtype_name(enum moe_dtype t)
{
    return (unsigned)t < MOE_DTYPE_COUNT ? dtypes[t].name : "?";
}

const char *moe_dtype_user_name(enum moe_dtype t)
{
    return (unsigned)t < MOE_DTYPE_COUNT ? dtypes[t].user : "?";
}

int moe_dtype_parse(const char *s, enum moe_dtype *ret)
{
    for (int i = 0; i < MOE_DTYPE_COUNT; i++) {
        if (strcmp(s, dtypes[i].name) == 0) {
            *ret = (enum moe_dtype)i;
            return 0;
        }
    }
    return -EINVAL;
}

int moe_dtype_parse_user(const char *s, enum moe_dtype *ret)
{
    static const struct {
        const char *name;
        enum moe_dtype t;
    } names[] = {
        {"bf16", MOE_DTYPE_BF16}, {"bfloat16", MOE_DTYPE_BF16}, {"f16", MOE_DTYPE_F16},
        {"fp16", MOE_DTYPE_F16},  {"float16", MOE_DTYPE_F16},   {"half", MOE_DTYPE_F16},
        {"f32", MOE_DTYPE_F32},   {"fp32", MOE_DTYPE_F32},      {"float32", MOE_DTYPE_F32},
        {"float", MOE_DTYPE_F32},
    };

    for (size_t i = 0; i < MOE_ARRAY_SIZE(names); i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *ret = names[i].t;
            return 0;
        }
    }
    return -EINVAL;
}

bool moe_dtype_is_compute(enum moe_dtype t)
{
    return t == MOE_DTYPE_F32 || t == MOE_DTYPE_F16 || t == MOE_DTYPE_BF16;
}

void *moe_alloc_aligned(size_t bytes)
{
    void *p = NULL;

    /* Round up so that vector loops may read whole 64-byte lines. */
    if (bytes > SIZE_MAX - 63)
        return NULL;
    bytes = (bytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0)
        return NULL;
    return p;
}

void moe_free_aligned(void *p)
{
    free(p);
}

uint64_t moe_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct timespec moe_realtime_after_ms(uint64_t ms)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    return ts;
}

int64_t moe_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, MOE_MIN(len - done, (size_t)1 << 30),
                          (off_t)(off + done));

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    return (int64_t)done;
}

const char *moe_shape_text(const int64_t *shape, int ndim, char *buf, size_t len)
{
    size_t at = 0;

    at += (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < ndim && at < len; i++)
        at += (size_t)snprintf(buf + at, len - at, "%s%" PRId64, i ? ", " : "", shape[i]);
    if (at < len)
        snprintf(buf + at, len - at, "]");
    return buf;
}

int moe_parse_bytes(const char *s, uint64_t *ret, struct moe_error *err)
{
    static const char *const suffix[] = {"", "K", "M", "G", "T"};
    unsigned long long v;
    char *end;

    if (!s || !*s || *s == '-' || *s == '+' || *s == ' ')
        return moe_error_set(err, -EINVAL, "'%s': expected a byte count such as 4096, 512M or 2G",
                             s ? s : "");
    errno = 0;
    v = strtoull(s, &end, 10);
    if (end == s)
        return moe_error_set(err, -EINVAL, "'%s': expected a byte count such as 4096, 512M or 2G",
                             s);
    if (errno == ERANGE)
        return moe_error_set(err, -ERANGE, "'%s': too large", s);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(suffix); i++) {
        char a[8], b[8];

        snprintf(a, sizeof(a), "%s", suffix[i]);
        snprintf(b, sizeof(b), "%siB", suffix[i]);
        if (strcasecmp(end, a) == 0 || (i > 0 && strcasecmp(end, b) == 0) ||
            (i == 0 && strcasecmp(end, "B") == 0)) {
            unsigned shift = 10u * (unsigned)i;

            if (shift && v > (UINT64_MAX >> shift))
                return moe_error_set(err, -ERANGE, "'%s': too large", s);
            *ret = (uint64_t)v << shift;
            return 0;
        }
    }
    return moe_error_set(
        err, -EINVAL, "'%s': unknown suffix '%s': expected K, M, G or T (powers of 1024)", s, end);
}
