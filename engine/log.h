/*
 * Logging for the engine and everything above it: one line per message,
 * with a level, to stderr (where journald picks it up) or to a sink the
 * program installs.  The level is a process-wide setting that may change at
 * any time (the daemon's SIGHUP); reading it is one relaxed atomic load.
 *
 *   moe_log(MOE_LOG_WARN, "pager: %s: O_DIRECT refused, using buffered reads", path);
 *
 * moe_log_once() keeps a flag per call site so that a condition met on every
 * read is reported the first time only.
 */
#ifndef MOED_ENGINE_LOG_H
#define MOED_ENGINE_LOG_H

#include <stdatomic.h>
#include <stdbool.h>

enum moe_log_level {
    MOE_LOG_ERROR = 0,
    MOE_LOG_WARN,
    MOE_LOG_INFO,
    MOE_LOG_DEBUG,
};

/* Messages above level are dropped.  Default MOE_LOG_WARN, or the
 * environment variable MOE_LOG_LEVEL read at the first message. */
void moe_log_set_level(enum moe_log_level level);
enum moe_log_level moe_log_get_level(void);
/* "error", "warn", "info", "debug" -> 0 and *ret, or -EINVAL. */
int moe_log_level_parse(const char *s, enum moe_log_level *ret);
const char *moe_log_level_name(enum moe_log_level level);

/* Where lines go; NULL restores stderr.  The sink gets the level and the
 * formatted message without a newline; it may be called from any thread. */
typedef void (*moe_log_sink)(enum moe_log_level level, const char *msg, void *arg);
void moe_log_set_sink(moe_log_sink sink, void *arg);

void moe_log(enum moe_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define moe_log_once(level, ...)                                                                   \
    do {                                                                                           \
        static atomic_bool moe_log_once_done_;                                                     \
        if (!atomic_exchange_explicit(&moe_log_once_done_, true, memory_order_relaxed))            \
            moe_log(level, __VA_ARGS__);                                                           \
    } while (0)

#endif
