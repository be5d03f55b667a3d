/*
 * Quantized weights (enum moe_quant, common.h): names, sizes, the scalar
 * decoding of each format (the reference every kernel is tested against),
 * quantizing rows to int8 and int4, and checking scales.
 *
 * Sizes: FP8 and INT8 take one byte per value, INT4 and MXFP4 half a byte
 * (cols must be even; every quantized matrix moed computes with has cols a
 * multiple of 32).  Scales are 4-byte floats (FP8, INT8, INT4) or 1-byte
 * e8m0 exponents (MXFP4), read with memcpy: a scale matrix need not be
 * aligned (a safetensors tensor may start at any byte).
 *
 * FP8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no
 * infinities; 0x7f and 0xff are NaN; largest finite 448.
 */
#ifndef MOED_ENGINE_QUANT_H
#define MOED_ENGINE_QUANT_H

#include "common.h"

/* Largest and default group (bcols) of moectl pack --quantize. */
#define MOE_QUANT_GROUP_MAX 4096
#define MOE_QUANT_INT8_GROUP 128
#define MOE_QUANT_INT4_GROUP 32

/* "none", "fp8", "int8", "int4", "mxfp4". */
const char *moe_quant_name(enum moe_quant q);
/* The inverse of moe_quant_name; -EINVAL for anything else. */
int moe_quant_parse(const char *s, enum moe_quant *ret);

/* Bytes of a rows x cols matrix of values; 0 when it overflows. */
uint64_t moe_quant_data_bytes(enum moe_quant q, int64_t rows, int64_t cols);
/* Bytes per scale: 4, or 1 for MXFP4. */
size_t moe_quant_scale_size(enum moe_quant q);
/* dtype of the values and of the scales as a checkpoint stores them. */
enum moe_dtype moe_quant_value_dtype(enum moe_quant q);
enum moe_dtype moe_quant_scale_dtype(enum moe_quant q);
/* The scale matrix's shape of a rows x cols matrix. */
void moe_quant_scale_shape(const struct moe_quant_fmt *f, int64_t rows, int64_t cols,
                           int64_t *ret_rows, int64_t *ret_cols);
/* Bytes of a rows x cols matrix's scales. */
uint64_t moe_quant_scale_bytes(const struct moe_quant_fmt *f, int64_t rows, int64_t cols);

float moe_fp8_e4m3_to_f32(uint8_t b);
/* Nearest e4m3fn value, ties to even; beyond 448 saturates to +-448 (as
 * torch's float8_e4m3fn conversion does for finite inputs); NaN to 0x7f. */
uint8_t moe_f32_to_fp8_e4m3(float f);
/* e2m1 nibble (sign in bit 3) to its value: 0, 0.5, 1, 1.5, 2, 3, 4, 6. */
float moe_e2m1_to_f32(unsigned nib);
/* e8m0: 2^(e - 127); 255 is NaN. */
float moe_e8m0_to_f32(uint8_t e);

/* Scale j of a scale row (memcpy: any alignment). */
float moe_quant_scale(enum moe_quant q, const void *srow, int64_t j);

/*
 * Row r of a rows x cols matrix of format f, values w and scales s, to fp32
 * out[0, cols): value times scale, each rounded once to fp32.
 */
void moe_quant_dequant_row(const struct moe_quant_fmt *f, const void *w, const void *s,
                           int64_t rows, int64_t cols, int64_t r, float *out);
/* Columns [c0, c0 + n) of one row, given its values wrow and its scale
 * row srow. */
void moe_quant_dequant_span(const struct moe_quant_fmt *f, const void *wrow, const void *srow,
                            int64_t c0, int64_t n, float *out);
/* The same as moe_quant_dequant_row in fp64, exactly (the test reference). */
void moe_quant_dequant_row_f64(const struct moe_quant_fmt *f, const void *w, const void *s,
                               int64_t rows, int64_t cols, int64_t r, double *out);

/*
 * Quantizes one row src[0, cols) (finite) to q (INT8 or INT4) with
 * symmetric scales per group elements: scale = max|x| / 127 (7 for INT4),
 * value = round(x / scale) (to nearest, ties away), clamped; an all-zero
 * group gets scale 0 and values 0.  Writes moe_quant_data_bytes(q, 1, cols)
 * bytes to dst and cols / group scales to scales.  cols % group == 0 and
 * group % 32 == 0.
 */
void moe_quant_row(enum moe_quant q, int group, const float *src, int64_t cols, void *dst,
                   float *scales);

/*
 * Quantizes one row src[0, cols) (finite; cols % 32 == 0) to MXFP4: per
 * block of 32, the e8m0 scale 2^s with s the least making max|x| / 2^s <=
 * 6 (s clamped to [-127, 127]; an all-zero block gets 2^0), and each value
 * x / 2^s rounded to the nearest e2m1 (ties to the even code), clamped to
 * +-6; element 2j in the low nibble of dst[j].  Writes cols / 2 bytes to
 * dst and cols / 32 to scales.
 */
void moe_quant_mxfp4_row(const float *src, int64_t cols, uint8_t *dst, uint8_t *scales);

/*
 * Checks a scale matrix: every scale finite and >= 0 (FP8, INT8, INT4), or
 * not 255 (MXFP4).  Returns 0, or -EINVAL with err naming tensor, the
 * scale's index and value.
 */
int moe_quant_check_scales(enum moe_quant q, const void *s, uint64_t n, const char *tensor,
                           struct moe_error *err);

#endif
