/*
 * Element types (engine/dtype.h and the dtype helpers of engine/common.c):
 * every f16 and bf16 bit pattern decoded against an independent formula
 * and round-tripped through f32; f32 -> f16 and f32 -> bf16 rounding
 * (nearest, ties to even, overflow, subnormals, -0, NaN) checked against a
 * reference computed in double, and against the F16C instructions where the
 * CPU has them, on tables of edge values, on every 16-bit neighbourhood and
 * on random values; dtype names, sizes and parsing.
 *
 * MOED_TEST_EXHAUSTIVE=1 also checks all 2^32 floats (about two minutes).
 */
#include "common.h"
#include "dtype.h"
#include "tests.h"

#include <errno.h>
#include <float.h>
#include <strings.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_F16C_BUILD 1
#endif

static float f32_from_bits(uint32_t u)
{
    float f;

    memcpy(&f, &u, sizeof(f));
    return f;
}

static uint32_t f32_bits(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    return u;
}

/* ------------------------------------------------------------------------ */
/* Independent references, in double. */

/* The value of an f16 pattern from its definition (NaN for NaNs). */
static double ref_f16_value(uint16_t h)
{
    int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    double v;

    if (exp == 0x1f)
        v = man ? NAN : INFINITY;
    else if (exp == 0)
        v = ldexp(man, -24);
    else
        v = ldexp(1024 + man, exp - 25);
    return sign ? -v : v;
}

/* The value of a bf16 pattern from its definition. */
static double ref_bf16_value(uint16_t h)
{
    int sign = h >> 15, exp = (h >> 7) & 0xff, man = h & 0x7f;
    double v;

    if (exp == 0xff)
        v = man ? NAN : INFINITY;
    else if (exp == 0)
        v = ldexp(man, -133);
    else
        v = ldexp(128 + man, exp - 134);
    return sign ? -v : v;
}

/*
 * Rounds finite x to a format with man_bits stored mantissa bits, minimum
 * normal exponent emin and largest finite value max: the quantum at x is
 * 2^(max(exponent of x, emin) - man_bits); x / quantum is exact in double
 * and rint() rounds it to even.  Beyond max, rounding goes to infinity when
 * the rounded value exceeds max (IEEE: at or past max + half a quantum,
 * with ties to even going up since max's mantissa is odd).
 */
static double ref_round(double x, int man_bits, int emin, double max)
{
    int e;
    double q, r;

    if (x == 0)
        return x;
    frexp(x, &e); /* x = m * 2^e, 0.5 <= |m| < 1: exponent e - 1 */
    e = MOE_MAX(e - 1, emin);
    q = ldexp(1.0, e - man_bits);
    r = rint(x / q) * q;
    if (fabs(r) > max)
        r = copysign(INFINITY, x);
    if (r == 0)
        r = copysign(0.0, x);
    return r;
}

/* Checks moe_f32_to_f16(f) against the reference; returns the pattern. */
static uint16_t check_f16(float f)
{
    uint16_t h = moe_f32_to_f16(f);
    double want, got = ref_f16_value(h);

    if (isnan(f)) {
        if (!isnan(got) || (h >> 15) != (f32_bits(f) >> 31))
            FAIL("f32 0x%08x (NaN) -> f16 0x%04x, expected a NaN of the same sign", f32_bits(f), h);
        /* Quiet, with the top of the payload. */
        if (h != (((f32_bits(f) >> 16) & 0x8000) | 0x7e00 | ((f32_bits(f) >> 13) & 0x3ff)))
            FAIL("f32 0x%08x (NaN) -> f16 0x%04x, expected the quiet NaN with its payload",
                 f32_bits(f), h);
        return h;
    }
    want = ref_round(f, 10, -14, 65504.0);
    if (got != want || !!signbit(got) != !!signbit(want))
        FAIL("f32 %.9g (0x%08x) -> f16 0x%04x = %.9g, expected %.9g", (double)f, f32_bits(f), h,
             got, want);
    return h;
}

/* Checks moe_f32_to_bf16(f) against the reference. */
static uint16_t check_bf16(float f)
{
    uint16_t h = moe_f32_to_bf16(f);
    double want, got = ref_bf16_value(h);

    if (isnan(f)) {
        if (!isnan(got) || (h >> 15) != (f32_bits(f) >> 31))
            FAIL("f32 0x%08x (NaN) -> bf16 0x%04x, expected a NaN of the same sign", f32_bits(f),
                 h);
        if (h != ((f32_bits(f) >> 16) | 0x40))
            FAIL("f32 0x%08x (NaN) -> bf16 0x%04x, expected the quiet NaN with its payload",
                 f32_bits(f), h);
        return h;
    }
    want = ref_round(f, 7, -126, ldexp(255, 120)); /* max finite (2 - 2^-7) * 2^127 */
    if (got != want || !!signbit(got) != !!signbit(want))
        FAIL("f32 %.9g (0x%08x) -> bf16 0x%04x = %.9g, expected %.9g", (double)f, f32_bits(f), h,
             got, want);
    return h;
}

/* ------------------------------------------------------------------------ */
/* F16C, where the CPU has it: the hardware's round-to-nearest-even. */

#ifdef HAVE_F16C_BUILD
__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f)
{
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("f16c"))) static float hw_f16_to_f32(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* CPUID says F16C, and the OS saves the YMM state its VEX encoding needs
 * (clang's __builtin_cpu_supports does not know "f16c"). */
static bool have_f16c(void)
{
    unsigned a, b, c, d, lo, hi;

    if (!__get_cpuid(1, &a, &b, &c, &d))
        return false;
    if (!(c & bit_F16C) || !(c & bit_OSXSAVE))
        return false;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 6) == 6; /* XMM and YMM state */
}
#else
static uint16_t hw_f32_to_f16(float f)
{
    (void)f;
    return 0;
}

static float hw_f16_to_f32(uint16_t h)
{
    (void)h;
    return 0;
}

static bool have_f16c(void)
{
    return false;
}
#endif

static bool f16c;

/* Both references, for one value. */
static void check_both(float f)
{
    uint16_t h = check_f16(f);

    check_bf16(f);
    /* F16C quiets NaNs keeping the payload's top bits, as we do. */
    if (f16c && hw_f32_to_f16(f) != h)
        FAIL("f32 %.9g (0x%08x) -> f16 0x%04x, F16C says 0x%04x", (double)f, f32_bits(f), h,
             hw_f32_to_f16(f));
}

/* ------------------------------------------------------------------------ */

/* All 65536 f16 patterns: the decode matches the definition, and f32 -> f16
 * gives the pattern back (NaNs stay NaNs, quiet ones bit for bit). */
static void test_f16_all_patterns(void)
{
    for (uint32_t i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i, back;
        float f = moe_f16_to_f32(h);
        double want = ref_f16_value(h);

        if (isnan(want)) {
            if (!isnan(f) || !!signbit(f) != (h >> 15))
                FAIL("f16 0x%04x (NaN) -> f32 %g (0x%08x)", h, (double)f, f32_bits(f));
            /* The payload moves up unchanged. */
            ASSERT_EQ(f32_bits(f),
                      ((uint32_t)(h & 0x8000) << 16) | 0x7f800000u | ((uint32_t)(h & 0x3ff) << 13));
        } else if ((double)f != want || !!signbit(f) != !!signbit(want)) {
            FAIL("f16 0x%04x -> f32 %.9g, expected %.9g", h, (double)f, want);
        }
        if (f16c && f32_bits(hw_f16_to_f32(h)) != f32_bits(f) && !(isnan(f) && !(h & 0x200)))
            FAIL("f16 0x%04x -> f32 0x%08x, F16C says 0x%08x", h, f32_bits(f),
                 f32_bits(hw_f16_to_f32(h)));

        back = moe_f32_to_f16(f);
        if (isnan(want)) {
            if ((back & 0x7c00) != 0x7c00 || !(back & 0x3ff) || (back >> 15) != (h >> 15))
                FAIL("f16 NaN 0x%04x -> f32 -> f16 0x%04x, not a NaN of the same sign", h, back);
            /* Signalling NaNs come back quiet, quiet ones unchanged. */
            ASSERT_EQ(back, h | 0x200);
        } else if (back != h) {
            FAIL("f16 0x%04x -> f32 %.9g -> f16 0x%04x", h, (double)f, back);
        }
    }
}

/* All 65536 bf16 patterns likewise. */
static void test_bf16_all_patterns(void)
{
    for (uint32_t i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i, back;
        float f = moe_bf16_to_f32(h);
        double want = ref_bf16_value(h);

        if (isnan(want)) {
            if (!isnan(f) || !!signbit(f) != (h >> 15))
                FAIL("bf16 0x%04x (NaN) -> f32 %g", h, (double)f);
        } else if ((double)f != want || !!signbit(f) != !!signbit(want)) {
            FAIL("bf16 0x%04x -> f32 %.9g, expected %.9g", h, (double)f, want);
        }
        ASSERT_EQ(f32_bits(f), (uint32_t)h << 16);
        back = moe_f32_to_bf16(f);
        if (isnan(want)) {
            if ((back & 0x7f80) != 0x7f80 || !(back & 0x7f) || (back >> 15) != (h >> 15))
                FAIL("bf16 NaN 0x%04x -> f32 -> bf16 0x%04x, not a NaN of the same sign", h, back);
            ASSERT_EQ(back, h | 0x40);
        } else if (back != h) {
            FAIL("bf16 0x%04x -> f32 %.9g -> bf16 0x%04x", h, (double)f, back);
        }
    }
}

/* Hand-worked conversions: the value, and the patterns expected. */
static const struct {
    uint32_t f32; /* the input's bits */
    uint16_t f16;
    uint16_t bf16;
    const char *what;
} edges[] = {
    {0x00000000, 0x0000, 0x0000, "+0"},
    {0x80000000, 0x8000, 0x8000, "-0 keeps its sign"},
    {0x3f800000, 0x3c00, 0x3f80, "1"},
    {0xc0000000, 0xc000, 0xc000, "-2"},
    {0x3dcccccd, 0x2e66, 0x3dcd, "0.1: f16 0x2e66 (0.0999755859), bf16 rounds up"},
    /* f16: 1 + 2^-11 is half an ulp above 1: ties to even (down); a bit
     * more rounds up; 1 + 3 * 2^-11 is halfway between 1 + 2^-10 (odd) and
     * 1 + 2^-9: up to even. */
    {0x3f801000, 0x3c00, 0x3f80, "1 + 2^-11: tie to even, down"},
    {0x3f801001, 0x3c01, 0x3f80, "1 + 2^-11 + 2^-23: up"},
    {0x3f803000, 0x3c02, 0x3f80, "1 + 3 * 2^-11: tie to even, up"},
    /* bf16: 1 + 2^-8 is half an ulp: down to 1; 1 + 3 * 2^-8: up. */
    {0x3f808000, 0x3c04, 0x3f80, "1 + 2^-8: bf16 tie to even, down"},
    {0x3f818000, 0x3c0c, 0x3f82, "1 + 3 * 2^-8: bf16 tie to even, up"},
    {0x3f808001, 0x3c04, 0x3f81, "1 + 2^-8 + 2^-23: bf16 up"},
    /* f16 top end: 65504 is the largest finite; 65520 is halfway to
     * 65536 (would-be 0x7c00) and ties to even, i.e. up to infinity. */
    {0x477fe000, 0x7bff, 0x4780, "65504, f16 max finite"},
    {0x477fefff, 0x7bff, 0x4780, "65519.998: 65504"},
    {0x477ff000, 0x7c00, 0x4780, "65520: f16 infinity"},
    {0x47800000, 0x7c00, 0x4780, "65536"},
    {0xc77ff000, 0xfc00, 0xc780, "-65520: f16 -infinity"},
    {0x501502f9, 0x7c00, 0x5015, "1e10"},
    /* f16 subnormals: 2^-24 is the smallest; 2^-25 ties to even (0);
     * 1.5 * 2^-24 ties to 2 * 2^-24; 1023.5 * 2^-24 ties up to the
     * smallest normal 2^-14. */
    {0x33800000, 0x0001, 0x3380, "2^-24, smallest f16 subnormal"},
    {0x33000000, 0x0000, 0x3300, "2^-25: tie to even, 0"},
    {0xb3000000, 0x8000, 0xb300, "-2^-25: -0"},
    {0x33000001, 0x0001, 0x3300, "2^-25 + tiny: up to 2^-24"},
    {0x33c00000, 0x0002, 0x33c0, "1.5 * 2^-24: tie to even, 2 * 2^-24"},
    {0x34200000, 0x0002, 0x3420, "2.5 * 2^-24: tie to even, 2 * 2^-24"},
    {0x387fc000, 0x03ff, 0x3880, "1023 * 2^-24, largest f16 subnormal"},
    {0x387fe000, 0x0400, 0x3880, "1023.5 * 2^-24: tie, up to 2^-14"},
    {0x38800000, 0x0400, 0x3880, "2^-14, smallest f16 normal"},
    {0x00000001, 0x0000, 0x0000, "smallest f32 subnormal"},
    {0x00008000, 0x0000, 0x0000, "f32 subnormal, bf16 tie to even (down)"},
    {0x00018000, 0x0000, 0x0002, "f32 subnormal, bf16 tie to even (up)"},
    {0x00800000, 0x0000, 0x0080, "FLT_MIN"},
    /* bf16 top end: 0x7f7f is the largest finite; FLT_MAX rounds to
     * infinity, halfway ties to even (0x7f7f is odd: up). */
    {0x7f7f0000, 0x7c00, 0x7f7f, "bf16 max finite"},
    {0x7f7f7fff, 0x7c00, 0x7f7f, "just under halfway: bf16 max"},
    {0x7f7f8000, 0x7c00, 0x7f80, "halfway: bf16 infinity"},
    {0x7f7fffff, 0x7c00, 0x7f80, "FLT_MAX: bf16 infinity"},
    {0x7f800000, 0x7c00, 0x7f80, "+inf"},
    {0xff800000, 0xfc00, 0xff80, "-inf"},
    {0x7fc00000, 0x7e00, 0x7fc0, "quiet NaN"},
    {0xffc00000, 0xfe00, 0xffc0, "-quiet NaN"},
    {0x7f800001, 0x7e00, 0x7fc0, "signalling NaN, payload below both: quieted"},
    {0x7fa00000, 0x7f00, 0x7fe0, "signalling NaN with a high payload bit"},
    {0x7f80e000, 0x7e07, 0x7fc0, "NaN payload 0xe000: f16 keeps 3 bits"},
};

static void test_edges(void)
{
    for (size_t i = 0; i < MOE_ARRAY_SIZE(edges); i++) {
        float f = f32_from_bits(edges[i].f32);
        uint16_t h = moe_f32_to_f16(f), b = moe_f32_to_bf16(f);

        if (h != edges[i].f16)
            FAIL("%s: f32 0x%08x -> f16 0x%04x, expected 0x%04x", edges[i].what, edges[i].f32, h,
                 edges[i].f16);
        if (b != edges[i].bf16)
            FAIL("%s: f32 0x%08x -> bf16 0x%04x, expected 0x%04x", edges[i].what, edges[i].f32, b,
                 edges[i].bf16);
        /* And the references agree with the hand-worked answers. */
        check_both(f);
    }
}

/*
 * Every 16-bit neighbourhood: for each f32 sign/exponent/top-mantissa
 * prefix, the low bits that decide rounding (exactly halfway, either side of
 * it, zero, all ones).  For f16 the low 13 bits decide, for bf16 the low 16.
 */
static void test_neighbourhoods(void)
{
    static const uint32_t lo13[] = {0, 1, 0xfff, 0x1000, 0x1001, 0x1fff, 0x0800, 0x17ff};
    static const uint32_t lo16[] = {0, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000};

    for (uint32_t top = 0; top < (1u << 19); top++) {
        for (size_t i = 0; i < MOE_ARRAY_SIZE(lo13); i++)
            check_f16(f32_from_bits(top << 13 | lo13[i]));
    }
    for (uint32_t top = 0; top < (1u << 16); top++) {
        for (size_t i = 0; i < MOE_ARRAY_SIZE(lo16); i++)
            check_bf16(f32_from_bits(top << 16 | lo16[i]));
    }
    if (f16c) {
        for (uint32_t top = 0; top < (1u << 19); top++) {
            for (size_t i = 0; i < MOE_ARRAY_SIZE(lo13); i++) {
                float f = f32_from_bits(top << 13 | lo13[i]);

                if (moe_f32_to_f16(f) != hw_f32_to_f16(f))
                    FAIL("f32 0x%08x -> f16 0x%04x, F16C says 0x%04x", f32_bits(f),
                         moe_f32_to_f16(f), hw_f32_to_f16(f));
            }
        }
    }
}

/* Random bit patterns, and random values in the ranges that matter. */
static void test_random(void)
{
    uint64_t rng = 1234;

    for (int i = 0; i < 2000000; i++) {
        uint64_t r = test_rand_u64(&rng);
        float f;

        switch (i % 4) {
        case 0: /* any pattern, NaNs and all */
            f = f32_from_bits((uint32_t)r);
            break;
        case 1: /* around the f16 range */
            f = (float)ldexp(test_rand_f32(&rng), (int)(r % 50) - 30);
            break;
        case 2: /* f16 subnormals */
            f = (float)ldexp(test_rand_f32(&rng), -14 - (int)(r % 12));
            break;
        default: /* near the f16 top */
            f = 65504.0f + test_rand_f32(&rng) * 64;
            break;
        }
        check_both(f);
    }
}

/* MOED_TEST_EXHAUSTIVE=1: all 2^32 floats against the reference (and F16C). */
static void test_exhaustive(void)
{
    const char *e = getenv("MOED_TEST_EXHAUSTIVE");
    uint32_t u = 0;

    if (!e || strcmp(e, "1") != 0)
        return;
    do {
        check_both(f32_from_bits(u));
    } while (++u != 0);
    fprintf(stderr, "exhaustive: all 2^32 floats checked\n");
}

/* ------------------------------------------------------------------------ */

static void test_names(void)
{
    static const struct {
        enum moe_dtype t;
        const char *name;
        size_t size;
    } table[] = {
        {MOE_DTYPE_F32, "F32", 4},         {MOE_DTYPE_F16, "F16", 2},
        {MOE_DTYPE_BF16, "BF16", 2},       {MOE_DTYPE_F64, "F64", 8},
        {MOE_DTYPE_F8_E4M3, "F8_E4M3", 1}, {MOE_DTYPE_F8_E5M2, "F8_E5M2", 1},
        {MOE_DTYPE_BOOL, "BOOL", 1},       {MOE_DTYPE_U8, "U8", 1},
        {MOE_DTYPE_I8, "I8", 1},           {MOE_DTYPE_I16, "I16", 2},
        {MOE_DTYPE_U16, "U16", 2},         {MOE_DTYPE_I32, "I32", 4},
        {MOE_DTYPE_U32, "U32", 4},         {MOE_DTYPE_I64, "I64", 8},
        {MOE_DTYPE_U64, "U64", 8},
    };
    static const char *bad[] = {"",     "f32",   "Bf16",  "F32 ",  " F32", "F8",
                                "FP32", "BF16x", "F16\n", "float", "I128"};

    ASSERT_EQ(MOE_ARRAY_SIZE(table), MOE_DTYPE_COUNT);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(table); i++) {
        enum moe_dtype t = MOE_DTYPE_COUNT;

        ASSERT_STREQ(moe_dtype_name(table[i].t), table[i].name);
        ASSERT_EQ(moe_dtype_size(table[i].t), table[i].size);
        ASSERT_EQ(moe_dtype_parse(table[i].name, &t), 0);
        ASSERT_EQ(t, table[i].t);
        /* The user name is the safetensors one in lower case. */
        ASSERT_EQ(strcasecmp(moe_dtype_user_name(table[i].t), table[i].name), 0);
        ASSERT_EQ(moe_dtype_is_compute(table[i].t), table[i].t == MOE_DTYPE_F32 ||
                                                        table[i].t == MOE_DTYPE_F16 ||
                                                        table[i].t == MOE_DTYPE_BF16);
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad); i++) {
        enum moe_dtype t = MOE_DTYPE_U64;

        if (moe_dtype_parse(bad[i], &t) != -EINVAL)
            FAIL("moe_dtype_parse accepted \"%s\"", bad[i]);
        ASSERT_EQ(t, MOE_DTYPE_U64); /* untouched */
    }
    /* Out of range. */
    ASSERT_EQ(moe_dtype_size(MOE_DTYPE_COUNT), 0);
    ASSERT_EQ(moe_dtype_size((enum moe_dtype) - 1), 0);
    ASSERT_STREQ(moe_dtype_name(MOE_DTYPE_COUNT), "?");
    ASSERT_STREQ(moe_dtype_name((enum moe_dtype) - 1), "?");
    ASSERT_STREQ(moe_dtype_user_name(MOE_DTYPE_COUNT), "?");
    ASSERT_TRUE(!moe_dtype_is_compute(MOE_DTYPE_COUNT));
}

static void test_parse_user(void)
{
    static const struct {
        const char *s;
        enum moe_dtype t;
    } good[] = {
        {"bf16", MOE_DTYPE_BF16}, {"BF16", MOE_DTYPE_BF16},   {"bfloat16", MOE_DTYPE_BF16},
        {"f16", MOE_DTYPE_F16},   {"fp16", MOE_DTYPE_F16},    {"float16", MOE_DTYPE_F16},
        {"half", MOE_DTYPE_F16},  {"F16", MOE_DTYPE_F16},     {"f32", MOE_DTYPE_F32},
        {"fp32", MOE_DTYPE_F32},  {"float32", MOE_DTYPE_F32}, {"Float32", MOE_DTYPE_F32},
        {"float", MOE_DTYPE_F32},
    };
    static const char *bad[] = {"",     "f64",       "float64", "i8",      "bf",           "bf16 ",
                                "f 16", "bfloat16x", "int8",    "F8_E4M3", "torch.float16"};
    static const enum moe_dtype compute[] = {MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16};

    for (size_t i = 0; i < MOE_ARRAY_SIZE(good); i++) {
        enum moe_dtype t = MOE_DTYPE_COUNT;

        if (moe_dtype_parse_user(good[i].s, &t) != 0)
            FAIL("moe_dtype_parse_user refused \"%s\"", good[i].s);
        ASSERT_EQ(t, good[i].t);
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad); i++) {
        enum moe_dtype t = MOE_DTYPE_U64;

        if (moe_dtype_parse_user(bad[i], &t) != -EINVAL)
            FAIL("moe_dtype_parse_user accepted \"%s\"", bad[i]);
        ASSERT_EQ(t, MOE_DTYPE_U64);
    }
    /* The compute types' user names parse back, and are the short ones. */
    for (size_t i = 0; i < MOE_ARRAY_SIZE(compute); i++) {
        enum moe_dtype t = MOE_DTYPE_COUNT;

        ASSERT_EQ(moe_dtype_parse_user(moe_dtype_user_name(compute[i]), &t), 0);
        ASSERT_EQ(t, compute[i]);
    }
    ASSERT_STREQ(moe_dtype_user_name(MOE_DTYPE_BF16), "bf16");
    ASSERT_STREQ(moe_dtype_user_name(MOE_DTYPE_F16), "f16");
    ASSERT_STREQ(moe_dtype_user_name(MOE_DTYPE_F32), "f32");
}

int main(void)
{
    f16c = have_f16c();
    fprintf(stderr, "F16C %s\n", f16c ? "present: checked against it too" : "absent");
    test_f16_all_patterns();
    test_bf16_all_patterns();
    test_edges();
    test_neighbourhoods();
    test_random();
    test_exhaustive();
    test_names();
    test_parse_user();
    return 0;
}
