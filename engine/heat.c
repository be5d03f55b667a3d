/*
 * Expert heat files (heat.h): parse, read, write.
 */
#include "heat.h"

#include "fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Parses an unsigned decimal at *p (no sign, at most 9 digits) and skips
 * the blanks after it.  false when there is none. */
static bool parse_uint(const char **p, const char *end, long *ret)
{
    const char *s = *p;
    long v = 0;
    int digits = 0;

    while (s < end && *s >= '0' && *s <= '9' && digits < 10) {
        v = v * 10 + (*s - '0');
        s++;
        digits++;
    }
    if (digits == 0 || digits == 10 || (s < end && *s != ' ' && *s != '\t'))
        return false;
    while (s < end && (*s == ' ' || *s == '\t'))
        s++;
    *p = s;
    *ret = v;
    return true;
}

/* A finite number >= 0 filling [p, end) (strtod on a bounded copy). */
static bool parse_heat(const char *p, const char *end, double *ret)
{
    char tmp[64];
    size_t n;
    char *stop;

    while (end > p && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
        end--;
    n = (size_t)(end - p);
    if (n == 0 || n >= sizeof(tmp))
        return false;
    memcpy(tmp, p, n);
    tmp[n] = '\0';
    /* digits, '.', 'e', '+', '-' only: no "nan", "inf" or hex */
    for (size_t i = 0; i < n; i++)
        if (!strchr("0123456789.eE+-", tmp[i]))
            return false;
    errno = 0;
    *ret = strtod(tmp, &stop);
    return *stop == '\0' && errno == 0 && isfinite(*ret) && *ret >= 0.0;
}

int moe_heat_parse(const char *buf, size_t len, const char *where, int n_layers, int n_experts,
                   double *heat, struct moe_error *err)
{
    const char *p = buf, *end = buf + len;
    size_t total = (size_t)n_layers * (size_t)n_experts;
    unsigned char *seen;
    bool header = false;
    int line = 0, r = 0;

    if (n_layers <= 0 || n_experts <= 0)
        return moe_error_set(err, -EINVAL, "%s: a model of %d layers and %d experts", where,
                             n_layers, n_experts);
    memset(heat, 0, total * sizeof(*heat));
    seen = calloc(total, 1);
    if (!seen)
        return moe_error_set(err, -ENOMEM, "%s: out of memory", where);
    while (p < end && r == 0) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *eol = nl ? nl : end, *q = p;
        long a, b, c;
        double h;

        line++;
        p = nl ? nl + 1 : end;
        if (q == eol || *q == '#')
            continue;
        if (memchr(q, '\0', (size_t)(eol - q))) {
            r = moe_error_set(err, -EINVAL, "%s:%d: a NUL byte (not a heat file)", where, line);
            break;
        }
        if (!header) {
            static const char magic[] = "moed-heat ";

            if ((size_t)(eol - q) < sizeof(magic) - 1 || memcmp(q, magic, sizeof(magic) - 1)) {
                r = moe_error_set(err, -EINVAL,
                                  "%s:%d: not a heat file (its first line is not "
                                  "\"moed-heat 1 LAYERS EXPERTS\")",
                                  where, line);
                break;
            }
            q += sizeof(magic) - 1;
            if (!parse_uint(&q, eol, &a) || !parse_uint(&q, eol, &b) || !parse_uint(&q, eol, &c) ||
                q != eol) {
                r = moe_error_set(err, -EINVAL,
                                  "%s:%d: the header must be \"moed-heat 1 LAYERS EXPERTS\"", where,
                                  line);
                break;
            }
            if (a != 1) {
                r = moe_error_set(err, -EINVAL,
                                  "%s:%d: heat format version %ld (this moed reads 1)", where, line,
                                  a);
                break;
            }
            if (b != n_layers || c != n_experts) {
                r = moe_error_set(err, -EINVAL,
                                  "%s:%d: saved for a model of %ld layers and %ld experts; this "
                                  "one has %d and %d",
                                  where, line, b, c, n_layers, n_experts);
                break;
            }
            header = true;
            continue;
        }
        if (!parse_uint(&q, eol, &a) || !parse_uint(&q, eol, &b) || !parse_heat(q, eol, &h)) {
            r = moe_error_set(err, -EINVAL,
                              "%s:%d: expected \"LAYER EXPERT HEAT\" (HEAT a finite number >= 0)",
                              where, line);
            break;
        }
        if (a >= n_layers || b >= n_experts) {
            r = moe_error_set(err, -EINVAL,
                              "%s:%d: layer %ld expert %ld is outside the model (%d layers, %d "
                              "experts)",
                              where, line, a, b, n_layers, n_experts);
            break;
        }
        size_t i = (size_t)a * (size_t)n_experts + (size_t)b;

        if (seen[i]) {
            r = moe_error_set(err, -EINVAL, "%s:%d: layer %ld expert %ld is named twice", where,
                              line, a, b);
            break;
        }
        seen[i] = 1;
        heat[i] = h;
    }
    if (r == 0 && !header)
        r = moe_error_set(err, -EINVAL, "%s: empty (no \"moed-heat\" header)", where);
    if (r < 0)
        memset(heat, 0, total * sizeof(*heat));
    free(seen);
    return r;
}

int moe_heat_read(const char *path, int n_layers, int n_experts, double *heat,
                  struct moe_error *err)
{
    char *buf;
    size_t len;
    int r = moe_read_regular_file(path, MOE_HEAT_MAX_BYTES, &buf, &len, err);

    if (r < 0)
        return r;
    r = moe_heat_parse(buf, len, path, n_layers, n_experts, heat, err);
    free(buf);
    return r;
}

int moe_heat_write(const char *path, int n_layers, int n_experts, const double *heat,
                   struct moe_error *err)
{
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    FILE *f = NULL;
    int fd, r = 0;

    if (!tmp)
        return moe_error_set(err, -ENOMEM, "%s: out of memory", path);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0640);
    if (fd < 0) {
        r = moe_error_set(err, -errno, "%s: %s", tmp, strerror(errno));
        free(tmp);
        return r;
    }
    f = fdopen(fd, "w");
    if (!f) {
        r = moe_error_set(err, -errno, "%s: %s", tmp, strerror(errno));
        close(fd);
        goto fail;
    }
    fprintf(f, "# moed expert heat: uses of each expert, read at start to page the hottest in\n");
    fprintf(f, "moed-heat 1 %d %d\n", n_layers, n_experts);
    for (int l = 0; l < n_layers; l++)
        for (int x = 0; x < n_experts; x++) {
            double h = heat[(size_t)l * n_experts + x];

            if (h > 0.0 && isfinite(h))
                fprintf(f, "%d %d %.10g\n", l, x, h);
        }
    if (fflush(f) != 0 || ferror(f) || fsync(fileno(f)) < 0) {
        r = moe_error_set(err, -(errno ? errno : EIO), "writing %s: %s", tmp,
                          strerror(errno ? errno : EIO));
        fclose(f);
        goto fail;
    }
    if (fclose(f) != 0) {
        r = moe_error_set(err, -errno, "writing %s: %s", tmp, strerror(errno));
        goto fail;
    }
    if (rename(tmp, path) < 0) {
        r = moe_error_set(err, -errno, "renaming %s to %s: %s", tmp, path, strerror(errno));
        goto fail;
    }
    free(tmp);
    return 0;
fail:
    unlink(tmp);
    free(tmp);
    return r;
}
