/*
 * Common definitions of the engine: error reporting, element types and
 * small helpers shared by every engine module.
 *
 * Errors: engine functions return 0 (or a count) on success and -errno on
 * failure.  Those that can fail on outside input also take an optional
 * struct moe_error into which they write one line saying what failed, where
 * (file, tensor, key) and what was expected.  The caller logs it once.
 */
#ifndef MOED_ENGINE_COMMON_H
#define MOED_ENGINE_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <time.h>

#define MOE_ERROR_MSG_MAX 1024
#define MOE_MAX_DIMS 8

/* One error: the -errno code and a message for people. */
struct moe_error {
    int code;                    /* negative errno, 0 when no error */
    char msg[MOE_ERROR_MSG_MAX]; /* NUL-terminated, "" when no error */
};

/*
 * Sets *err (when err is not NULL) to code and the formatted message, and
 * returns code (a negative errno) so that callers can write
 * `return moe_error_set(err, -EINVAL, "...")`.
 */
int moe_error_set(struct moe_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepends "prefix: " to an error message already set (no-op for NULL). */
void moe_error_prefix(struct moe_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/*
 * Element types.  Every dtype of the safetensors format is listed so that the
 * loader can check the byte ranges of tensors it does not use; only F32, F16
 * and BF16 are computed with (moe_dtype_is_compute()).
 */
enum moe_dtype {
    MOE_DTYPE_F32 = 0,
    MOE_DTYPE_F16,
    MOE_DTYPE_BF16,
    MOE_DTYPE_F64,
    MOE_DTYPE_F8_E4M3,
    MOE_DTYPE_F8_E5M2,
    MOE_DTYPE_BOOL,
    MOE_DTYPE_U8,
    MOE_DTYPE_I8,
    MOE_DTYPE_I16,
    MOE_DTYPE_U16,
    MOE_DTYPE_I32,
    MOE_DTYPE_U32,
    MOE_DTYPE_I64,
    MOE_DTYPE_U64,
    MOE_DTYPE_COUNT,
};

/* Bytes per element. */
size_t moe_dtype_size(enum moe_dtype t);
/* The safetensors spelling: "F32", "BF16", ... */
const char *moe_dtype_name(enum moe_dtype t);
/* Parses a safetensors dtype string; returns 0 and sets *ret, or -EINVAL. */
int moe_dtype_parse(const char *s, enum moe_dtype *ret);
/* Parses a user-facing name: "bf16", "f16", "f32" (also "bfloat16",
 * "float16", "float32" as in config.json's torch_dtype); -EINVAL otherwise. */
int moe_dtype_parse_user(const char *s, enum moe_dtype *ret);
/* Lower-case user-facing name: "bf16", "f16", "f32", or the safetensors one. */
const char *moe_dtype_user_name(enum moe_dtype t);
/* True for the types the engine computes with: F32, F16, BF16. */
bool moe_dtype_is_compute(enum moe_dtype t);

/*
 * Quantized weight formats (engine/quant.h has their arithmetic).  A
 * quantized [rows, cols] matrix is stored as its values, row-major, and a
 * separate scale matrix [ceil(rows / brows), ceil(cols / bcols)], row-major:
 * weight (r, c) = value(r, c) * scale(r / brows, c / bcols).
 */
enum moe_quant {
    MOE_QUANT_NONE = 0, /* a plain F32, F16 or BF16 matrix */
    MOE_QUANT_FP8,      /* float8 e4m3fn bytes; F32 scales (weight_scale_inv) per
                         * brows x bcols block, as DeepSeek-V3 and Qwen3 FP8 publish */
    MOE_QUANT_INT8,     /* int8 in [-127, 127]; F32 scales per 1 x bcols group */
    MOE_QUANT_INT4,     /* int4 in [-7, 7] stored as q + 8, two per byte (element
                         * 2j in the low nibble, 2j + 1 in the high); F32 scales
                         * per 1 x bcols group */
    MOE_QUANT_MXFP4,    /* OCP MXFP4 as gpt-oss stores it: e2m1 nibbles, packed as
                         * INT4; U8 e8m0 scales (2^(s - 127)) per 1 x 32 */
    MOE_QUANT_COUNT,
};

/* A matrix's quantization: the format and its scale block. */
struct moe_quant_fmt {
    enum moe_quant q;
    int brows; /* rows per scale row (FP8: 128; 1 otherwise; 0 for NONE) */
    int bcols; /* elements per scale along a row (a multiple of 32; 0 for NONE) */
};

/* 64-byte aligned allocation (cache line, AVX-512); free with moe_free_aligned. */
void *moe_alloc_aligned(size_t bytes);
void moe_free_aligned(void *p);

/* Checked size arithmetic: returns false on overflow. */
static inline bool moe_mul_size(size_t a, size_t b, size_t *ret)
{
    return !__builtin_mul_overflow(a, b, ret);
}

static inline bool moe_add_size(size_t a, size_t b, size_t *ret)
{
    return !__builtin_add_overflow(a, b, ret);
}

/*
 * Reads up to len bytes of fd at off, retrying on EINTR and partial reads
 * (in chunks of at most 1 GiB).  Returns the bytes read, fewer than len only
 * at end of file, or -errno.
 */
int64_t moe_pread_full(int fd, void *buf, size_t len, uint64_t off);

/*
 * Parses a byte count: a non-negative integer with an optional suffix K, M,
 * G or T (powers of 1024; "KiB", "MiB", "GiB", "TiB" and "B" also accepted).
 * Returns 0, or -EINVAL with err saying what is expected, or -ERANGE.
 */
int moe_parse_bytes(const char *s, uint64_t *ret, struct moe_error *err);

/* Formats a shape as "[8, 16]" into buf; returns buf. */
const char *moe_shape_text(const int64_t *shape, int ndim, char *buf, size_t len);

/* Monotonic clock in nanoseconds. */
uint64_t moe_now_ns(void);
/* CLOCK_REALTIME now plus ms, for pthread_cond_timedwait. */
struct timespec moe_realtime_after_ms(uint64_t ms);

#define MOE_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MOE_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MOE_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
