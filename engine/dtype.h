/*
 * Scalar conversions between fp32 and the 16-bit float formats.  All are
 * exact inverses where the value is representable; narrowing rounds to
 * nearest even, keeps infinities and quiets NaNs.
 */
#ifndef MOED_ENGINE_DTYPE_H
#define MOED_ENGINE_DTYPE_H

#include <stdint.h>
#include <string.h>

static inline float moe_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;

    memcpy(&f, &u, sizeof(f));
    return f;
}

static inline uint16_t moe_f32_to_bf16(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float moe_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    float f;

    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else {
        /* subnormal: value = man * 2^-24 */
        f = (float)man * 0x1p-24f;
        memcpy(&u, &f, sizeof(u));
        u |= sign;
    }
    memcpy(&f, &u, sizeof(f));
    return f;
}

static inline uint16_t moe_f32_to_f16(float f)
{
    uint32_t u, sign, a;

    memcpy(&u, &f, sizeof(u));
    sign = (u >> 16) & 0x8000u;
    a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below 2^-14: subnormal or zero */
        float af;
        uint32_t m;

        memcpy(&af, &a, sizeof(af));
        /* af * 2^24 is the subnormal mantissa; rint rounds to even. */
        m = (uint32_t)__builtin_rintf(af * 0x1p24f);
        return (uint16_t)(sign | m);
    }
    /* normal: rebias exponent, round the 13 dropped bits to nearest even */
    a += ((uint32_t)(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | (a >> 13));
}

#endif
