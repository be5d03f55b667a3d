/*
 * moed's log lines (logging.h).  The engine's moe_log formats the message
 * and calls the sink under its own lock; the sink adds the prefix and
 * writes the line with one write(2), so that lines of different threads do
 * not interleave.  The format and the journal flag are relaxed atomics: a
 * line written in the old format while SIGHUP changes it is harmless.
 */
#include "logging.h"

#include "common.h"
#include "log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_BYTES 4096

static atomic_int cur_format;  /* enum moed_log_format */
static atomic_bool to_journal; /* stderr is the journal */

bool moed_log_to_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    char extra;

    if (!js || sscanf(js, "%llu:%llu%c", &dev, &ino, &extra) != 2)
        return false;
    if (fstat(STDERR_FILENO, &st) < 0)
        return false;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

/* The syslog priority the journal reads from a "<N>" prefix. */
static int priority(enum moe_log_level level)
{
    static const int prio[] = {3, 4, 6, 7}; /* err, warning, info, debug */

    return (unsigned)level < 4 ? prio[level] : 7;
}

/* "2025-06-01T12:00:00.123+02:00", local time. */
static void timestamp(char *buf, size_t len)
{
    struct timespec ts;
    struct tm tm;
    char zone[8];
    size_t n;

    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
    if (strftime(zone, sizeof(zone), "%z", &tm) != 5)
        snprintf(zone, sizeof(zone), "+0000");
    snprintf(buf + n, len - n, ".%03ld%.3s:%.2s", ts.tv_nsec / 1000000, zone, zone + 3);
}

/* Appends s to buf at *n as a JSON string body (no quotes). */
static void json_escape(char *buf, size_t len, size_t *n, const char *s)
{
    for (; *s && *n + 8 < len; s++) {
        unsigned char c = (unsigned char)*s;

        if (c == '"' || c == '\\') {
            buf[(*n)++] = '\\';
            buf[(*n)++] = (char)c;
        } else if (c < 0x20) {
            *n += (size_t)snprintf(buf + *n, len - *n, "\\u%04x", c);
        } else {
            buf[(*n)++] = (char)c;
        }
    }
    buf[*n] = 0;
}

/* Appends printf output to buf at *n, never past len. */
static void append(char *buf, size_t len, size_t *n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void append(char *buf, size_t len, size_t *n, const char *fmt, ...)
{
    va_list ap;
    int r;

    if (*n >= len)
        return;
    va_start(ap, fmt);
    r = vsnprintf(buf + *n, len - *n, fmt, ap);
    va_end(ap);
    if (r > 0)
        *n = MOE_MIN(*n + (size_t)r, len - 1);
}

/* Writes one line: the prefix of the format, msg, and (json) fields, a
 * string of ",\"key\":value" pairs already escaped. */
static void write_line(enum moe_log_level level, const char *msg, const char *fields)
{
    char line[LINE_MAX_BYTES], ts[48];
    bool journal = atomic_load_explicit(&to_journal, memory_order_relaxed);
    size_t n = 0;

    if (journal)
        append(line, sizeof(line), &n, "<%d>", priority(level));
    if (atomic_load_explicit(&cur_format, memory_order_relaxed) == MOED_LOG_JSON) {
        timestamp(ts, sizeof(ts));
        append(line, sizeof(line), &n, "{\"ts\":\"%s\",\"level\":\"%s\",\"pid\":%d,\"msg\":\"", ts,
               moe_log_level_name(level), (int)getpid());
        json_escape(line, sizeof(line) - 32, &n, msg);
        append(line, sizeof(line), &n, "\"%s}", fields ? fields : "");
    } else {
        if (!journal) {
            timestamp(ts, sizeof(ts));
            append(line, sizeof(line), &n, "%s moed[%d] ", ts, (int)getpid());
        }
        append(line, sizeof(line), &n, "%s: %s", moe_log_level_name(level), msg);
    }
    if (n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    /* Best effort: there is nowhere to report a failed log write. */
    if (write(STDERR_FILENO, line, n) < 0)
        errno = 0;
}

static void sink(enum moe_log_level level, const char *msg, void *arg)
{
    (void)arg;
    write_line(level, msg, NULL);
}

void moed_log_start(enum moed_log_format f)
{
    atomic_store_explicit(&cur_format, (int)f, memory_order_relaxed);
    atomic_store_explicit(&to_journal, moed_log_to_journal(), memory_order_relaxed);
    moe_log_set_sink(sink, NULL);
}

const char *moed_log_bytes(uint64_t n, char buf[MOED_BYTES_MAX])
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double v = (double)n;
    int u = 0;

    while (v >= 1024 && u < 6) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, MOED_BYTES_MAX, "%" PRIu64 " B", n);
    else if (v >= 100 || v == (double)(uint64_t)v)
        snprintf(buf, MOED_BYTES_MAX, "%.0f %s", v, units[u]);
    else
        snprintf(buf, MOED_BYTES_MAX, "%.3g %s", v, units[u]);
    return buf;
}

void moed_log_request(const char *model, int layer, int tokens, const char *transport,
                      const char *status, uint64_t duration_ns)
{
    char msg[512], fields[640], name[256], quoted[260], layer_s[16];
    size_t n = 0;

    if (moe_log_get_level() < MOE_LOG_DEBUG)
        return;
    /* A client names the model: quote it escaped, whatever it is. */
    name[0] = 0;
    json_escape(name, sizeof(name), &n, model ? model : "");
    if (layer >= 0)
        snprintf(layer_s, sizeof(layer_s), "%d", layer);
    else
        snprintf(layer_s, sizeof(layer_s), "?");
    snprintf(quoted, sizeof(quoted), model ? "'%s'" : "(none loaded)", name);
    snprintf(msg, sizeof(msg), "request: model %s layer %s, %d tokens over %s: %s in %.3f ms",
             quoted, layer_s, tokens, transport, status, duration_ns / 1e6);
    snprintf(quoted, sizeof(quoted), model ? "\"%s\"" : "null", name);
    snprintf(fields, sizeof(fields),
             ",\"model\":%s,\"layer\":%d,\"tokens\":%d,\"transport\":\"%s\","
             "\"status\":\"%s\",\"time_ms\":%.3f",
             quoted, layer, tokens, transport, status, duration_ns / 1e6);
    write_line(MOE_LOG_DEBUG, msg, fields);
}
