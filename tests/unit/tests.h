/*
 * Minimal test helpers: assertions that print both values and file:line,
 * then exit 1.  Exit code 77 means "skipped" (ctest SKIP_RETURN_CODE).
 */
#ifndef MOED_TESTS_H
#define MOED_TESTS_H

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_SKIP 77

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                                            \
        fprintf(stderr, __VA_ARGS__);                                                              \
        fprintf(stderr, "\n");                                                                     \
        exit(1);                                                                                   \
    } while (0)

#define ASSERT_TRUE(c)                                                                             \
    do {                                                                                           \
        if (!(c))                                                                                  \
            FAIL("assertion failed: %s", #c);                                                      \
    } while (0)

#define ASSERT_EQ(a, b)                                                                            \
    do {                                                                                           \
        long long _a = (long long)(a), _b = (long long)(b);                                        \
        if (_a != _b)                                                                              \
            FAIL("%s == %s failed: %lld != %lld", #a, #b, _a, _b);                                 \
    } while (0)

#define ASSERT_NE(a, b)                                                                            \
    do {                                                                                           \
        long long _a = (long long)(a), _b = (long long)(b);                                        \
        if (_a == _b)                                                                              \
            FAIL("%s != %s failed: both %lld", #a, #b, _a);                                        \
    } while (0)

#define ASSERT_STREQ(a, b)                                                                         \
    do {                                                                                           \
        const char *_a = (a), *_b = (b);                                                           \
        if (!_a || !_b || strcmp(_a, _b) != 0)                                                     \
            FAIL("%s == %s failed: \"%s\" != \"%s\"", #a, #b, _a ? _a : "(null)",                  \
                 _b ? _b : "(null)");                                                              \
    } while (0)

/* The string a contains b. */
#define ASSERT_CONTAINS(a, b)                                                                      \
    do {                                                                                           \
        const char *_a = (a), *_b = (b);                                                           \
        if (!_a || !_b || !strstr(_a, _b))                                                         \
            FAIL("\"%s\" does not contain \"%s\"", _a ? _a : "(null)", _b ? _b : "(null)");        \
    } while (0)

#define ASSERT_NEAR(a, b, tol)                                                                     \
    do {                                                                                           \
        double _a = (double)(a), _b = (double)(b), _t = (double)(tol);                             \
        if (!(fabs(_a - _b) <= _t))                                                                \
            FAIL("%s ~= %s failed: %.9g vs %.9g (diff %.3g > %.3g)", #a, #b, _a, _b,               \
                 fabs(_a - _b), _t);                                                               \
    } while (0)

/* Relative L2 error of got against a double reference. */
static inline double test_rel_l2_f32(const float *got, const double *ref, size_t n)
{
    double num = 0, den = 0;

    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* A deterministic generator for test data (splitmix64). */
static inline uint64_t test_rand_u64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static inline float test_rand_f32(uint64_t *s)
{
    return (float)((double)(test_rand_u64(s) >> 11) * 0x1p-53 * 2.0 - 1.0);
}

/* Makes a fresh empty temporary directory under $TMPDIR (or /tmp); the
 * caller frees the returned path. */
static inline char *test_tmpdir(const char *tag)
{
    const char *base = getenv("TMPDIR");
    char *p;

    if (!base || !*base)
        base = "/tmp";
    if (asprintf(&p, "%s/moed-%s-XXXXXX", base, tag) < 0)
        FAIL("asprintf");
    if (!mkdtemp(p))
        FAIL("mkdtemp %s", p);
    return p;
}

/* Removes a directory tree made by test_tmpdir. */
static inline void test_rmtree(const char *path)
{
    char *cmd;

    if (asprintf(&cmd, "rm -rf '%s'", path) < 0)
        FAIL("asprintf");
    if (system(cmd) != 0)
        fprintf(stderr, "warning: could not remove %s\n", path);
    free(cmd);
}

#endif
