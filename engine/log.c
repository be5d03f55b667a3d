/*
 * Logging (see log.h).  Lines to stderr are written with one write(2) so
 * that lines from different threads do not interleave.
 */
#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static const char *const names[] = {"error", "warn", "info", "debug"};

/* -1 until the first use reads MOE_LOG_LEVEL. */
static atomic_int cur_level = -1;
static pthread_mutex_t sink_lock = PTHREAD_MUTEX_INITIALIZER;
static moe_log_sink cur_sink;
static void *cur_arg;

int moe_log_level_parse(const char *s, enum moe_log_level *ret)
{
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (s && strcasecmp(s, names[i]) == 0) {
            *ret = (enum moe_log_level)i;
            return 0;
        }
    }
    if (s && strcasecmp(s, "warning") == 0) {
        *ret = MOE_LOG_WARN;
        return 0;
    }
    return -EINVAL;
}

const char *moe_log_level_name(enum moe_log_level level)
{
    return (unsigned)level < sizeof(names) / sizeof(names[0]) ? names[level] : "?";
}

void moe_log_set_level(enum moe_log_level level)
{
    atomic_store_explicit(&cur_level, (int)level, memory_order_relaxed);
}

enum moe_log_level moe_log_get_level(void)
{
    int l = atomic_load_explicit(&cur_level, memory_order_relaxed);

    if (l < 0) {
        enum moe_log_level e = MOE_LOG_WARN;
        const char *s = getenv("MOE_LOG_LEVEL");

        if (s && moe_log_level_parse(s, &e) < 0)
            e = MOE_LOG_WARN;
        l = (int)e;
        atomic_store_explicit(&cur_level, l, memory_order_relaxed);
    }
    return (enum moe_log_level)l;
}

void moe_log_set_sink(moe_log_sink sink, void *arg)
{
    pthread_mutex_lock(&sink_lock);
    cur_sink = sink;
    cur_arg = arg;
    pthread_mutex_unlock(&sink_lock);
}

void moe_log(enum moe_log_level level, const char *fmt, ...)
{
    char msg[2048], line[2100];
    va_list ap;
    int n;

    if ((int)level > (int)moe_log_get_level())
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&sink_lock);
    if (cur_sink) {
        cur_sink(level, msg, cur_arg);
        pthread_mutex_unlock(&sink_lock);
        return;
    }
    pthread_mutex_unlock(&sink_lock);
    n = snprintf(line, sizeof(line), "%s: %s\n", moe_log_level_name(level), msg);
    if (n > (int)sizeof(line) - 1) {
        n = (int)sizeof(line) - 1;
        line[n - 1] = '\n';
    }
    /* Best effort: there is nowhere to report a failed log write. */
    if (write(STDERR_FILENO, line, (size_t)n) < 0)
        errno = 0;
}
