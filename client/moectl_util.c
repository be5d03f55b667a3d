/*
 * moectl's shared helpers (moectl.h): the error line, option values parsed
 * with their range, byte counts for people, a JSON answer printed.  Used
 * by moectl.c and every command file; depends on none of them.
 */
#include "moectl.h"

#include "common.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *prog = "moectl";

void moectl_errorf(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* Parses a whole decimal integer in [min, max] for option opt. */
int moectl_parse_long(const char *opt, const char *s, long min, long max, long *ret)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) {
        errorf("%s '%s': expected an integer from %ld to %ld", opt, s, min, max);
        return -EINVAL;
    }
    *ret = v;
    return 0;
}

int moectl_parse_int(const char *opt, const char *s, int min, int max, int *ret)
{
    long v;
    int r = parse_long(opt, s, min, max, &v);

    if (r == 0)
        *ret = (int)v;
    return r;
}

int moectl_parse_u64(const char *opt, const char *s, uint64_t *ret)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s || *end || s[0] == '-') {
        errorf("%s '%s': expected a non-negative integer", opt, s);
        return -EINVAL;
    }
    *ret = v;
    return 0;
}

int moectl_parse_bytes(const char *opt, const char *s, uint64_t *ret)
{
    struct moe_error err;

    if (moe_parse_bytes(s, ret, &err) < 0) {
        errorf("%s: %s", opt, err.msg);
        return -EINVAL;
    }
    return 0;
}

/* "1.5 GiB" */
const char *moectl_human_bytes(uint64_t n, char *buf, size_t len)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)n;
    size_t u = 0;

    while (v >= 1024.0 && u + 1 < MOE_ARRAY_SIZE(units)) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%llu B", (unsigned long long)n);
    else
        snprintf(buf, len, "%.1f %s", v, units[u]);
    return buf;
}

/* Prints j (taking it) on stdout; 0, or 1 when it could not be built.  Reals
 * with 6 significant digits, what they are good for, not 17. */
int print_json(struct moectl_remote *r, json_t *j)
{
    if (!j || json_dumpf(j, stdout, JSON_INDENT(2) | JSON_REAL_PRECISION(6)) < 0) {
        errorf("%s: cannot write the answer as JSON (out of memory?)", r->cmd);
        json_decref(j);
        return 1;
    }
    fputc('\n', stdout);
    json_decref(j);
    return 0;
}
