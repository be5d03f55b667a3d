/*
 * The tile-walking loop of the vectorised CPU kernels (see kernels.h,
 * moe_cpu_dot_tiles).  Plain C: it only calls the variant's tile functions,
 * so one copy serves every instruction set.
 */
#include <math.h>
#include <string.h>

#include "common.h"
#include "dtype.h"
#include "kernels.h"

static inline void run_k(moe_cpu_tile_fn f, const char *w, int64_t ldw, const void *const *x,
                         int64_t k, float *y, int64_t ldy, int64_t ys)
{
    for (int64_t k0 = 0; k0 < k; k0 += MOE_CPU_KBLOCK)
        f(w, ldw, x, k0, MOE_MIN(k0 + MOE_CPU_KBLOCK, k), y, ldy, ys, k0 == 0);
}

void moe_cpu_dot_tiles(const struct moe_cpu_tiling *tl, const void *w, int64_t ldw, int nr,
                       int64_t k, const void *const *x, int nt, float *y, int64_t ldy)
{
    const char *wb = w;
    const size_t esz = tl->esz;
    const int rmax = tl->rmax, tmax = tl->tmax;

    if (nt <= tl->dmax) {
        int rows = tl->dec_rows[nt - 1];
        int s = nr / rows;

        for (int j = 0; j < s; j++)
            run_k(tl->dec[nt - 1], wb + (size_t)j * ldw * esz, ldw * s, x, k, y + j, ldy, s);
        /* the last nr % rows rows, in ordinary tiles of at most tmax tokens */
        for (int r0 = s * rows; r0 < nr; r0 += rmax) {
            int rr = MOE_MIN(rmax, nr - r0);

            for (int t0 = 0; t0 < nt; t0 += tmax) {
                int tt = MOE_MIN(tmax, nt - t0);

                run_k(tl->tiles[(rr - 1) * tmax + tt - 1], wb + (size_t)r0 * ldw * esz, ldw, x + t0,
                      k, y + (int64_t)t0 * ldy + r0, ldy, 1);
            }
        }
        return;
    }
    for (int64_t k0 = 0; k0 < k; k0 += MOE_CPU_KBLOCK) {
        int64_t k1 = MOE_MIN(k0 + MOE_CPU_KBLOCK, k);

        for (int t0 = 0; t0 < nt; t0 += tmax) {
            int tt = MOE_MIN(tmax, nt - t0);

            for (int r0 = 0; r0 < nr; r0 += rmax) {
                int rr = MOE_MIN(rmax, nr - r0);

                tl->tiles[(rr - 1) * tmax + tt - 1](wb + (size_t)r0 * ldw * esz, ldw, x + t0, k0,
                                                    k1, y + (int64_t)t0 * ldy + r0, ldy, 1,
                                                    k0 == 0);
            }
        }
    }
}

void moe_cpu_round_f32(void *prepared, int64_t n_pad)
{
    float *p = prepared;

    for (int64_t i = 0; i < n_pad; i++)
        p[i] = moe_bf16_to_f32(moe_f32_to_bf16(p[i]));
}

void moe_cpu_make_x8(float *row, int64_t n_pad)
{
    uint32_t umax = 0;
    int e = 0, sh;

    for (int64_t i = 0; i < n_pad; i++) {
        uint32_t u;

        memcpy(&u, &row[i], 4);
        u &= 0x7fffffffu;
        if (u < 0x7f800000u && u > umax)
            umax = u;
    }
    if (umax >= 0x00800000u)
        e = (int)(umax >> 23) - 127;
    else if (umax)
        e = 31 - __builtin_clz(umax) - 149; /* subnormal */
    /* times 2^(120 - e), -7 <= 120 - e <= 269: at most 2^127 per multiply,
     * each exact (only the smallest values of a row of e > 120 could lose
     * bits, to subnormals, 2^-247 below its largest) */
    for (sh = 120 - e; sh != 0;) {
        int s1 = sh > 127 ? 127 : sh;
        float f = ldexpf(1.0f, s1);

        for (int64_t i = 0; i < n_pad; i++)
            row[i] *= f;
        sh -= s1;
    }
    for (int64_t b = 0; b < n_pad; b += 32) {
        float v[32];

        for (int j = 0; j < 32; j++)
            v[moe_cpu_x8_pos(j)] = row[b + j];
        memcpy(row + b, v, sizeof(v));
    }
    row[n_pad] = ldexpf(1.0f, e);
    for (int i = 1; i < MOE_CPU_KPAD; i++)
        row[n_pad + i] = 0.0f;
}

void moe_cpu_prep_a8(const float *src, int64_t n, int64_t n_pad, void *dst)
{
    for (int64_t b = 0; b < n_pad; b += 32) {
        uint8_t *o = (uint8_t *)dst + b * 4;
        float amax = 0.0f, d, id, off;
        int32_t q[32], qs = 0;
        bool bad = false;

        for (int j = 0; j < 32; j++) {
            float v = b + j < n ? src[b + j] : 0.0f;

            bad |= !isfinite(v);
            amax = fabsf(v) > amax ? fabsf(v) : amax;
        }
        d = bad ? NAN : amax / 127.0f;
        id = bad || amax == 0.0f ? 0.0f : 127.0f / amax;
        for (int j = 0; j < 32; j++) {
            /* a block with a non-finite value: zeros, and its scale NaN
             * (NaN times 0 is NaN, which no int holds) */
            float v = b + j < n && !bad ? src[b + j] * id : 0.0f;

            q[j] = (int32_t)nearbyintf(v);
            q[j] = q[j] > 127 ? 127 : q[j] < -127 ? -127 : q[j];
            qs += q[j];
            /* in order, and element j at position j / 2 (even j) or 16 +
             * j / 2 (odd j) */
            o[MOE_CPU_A8_SEQ + j] = (uint8_t)(int8_t)q[j];
            o[j % 2 * 16 + j / 2] = (uint8_t)(int8_t)q[j];
        }
        off = (float)(8 * qs) * d;
        memcpy(o + MOE_CPU_A8_SCALE, &d, 4);
        memcpy(o + MOE_CPU_A8_OFF, &off, 4);
        memset(o + MOE_CPU_A8_OFF + 4, 0, MOE_CPU_A8_BLOCK - MOE_CPU_A8_OFF - 4);
    }
}
